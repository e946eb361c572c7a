import pytest

from fastllm import ops


@pytest.fixture(params=["avx2", "generic"])
def isa(request):
    """A CPU kernel test runs on both builds (AVX2 + FMA only where the CPU has it):
    ops.quant_cpu_force_generic switches every CPU kernel to its portable build."""
    ops.quant_cpu_force_generic(request.param == "generic")
    ops.set_cpu_int8_activations(False)   # exact fp32 x: test_quant_linear's int8 tests cover the rest
    if request.param == "avx2" and ops.quant_cpu_isa() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA")
    yield request.param
    ops.quant_cpu_force_generic(False)
    ops.set_cpu_int8_activations(True)
