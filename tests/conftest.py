import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests carry the `cuda` marker and skip on machines without a GPU (DESIGN §5).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gguf_path():
    """The default model's GGUF (SmolLM2-135M-Instruct), fetched once into the cache.
    Skips when it cannot be fetched (no network), except under CI, where that fails."""
    from fastllm.model import default_model
    try:
        return default_model.default_model_path()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture
def fp32_activations(monkeypatch):
    """CPU kernels with fp32 activations (what a float64 reference or the dequantized model
    multiplies), instead of the default int8 rounding of x: set now and for GGUF models
    loaded in the test (the loader applies FASTLLM_CPU_INT8_ACTIVATIONS); restored after."""
    from fastllm import ops
    monkeypatch.setenv("FASTLLM_CPU_INT8_ACTIVATIONS", "0")
    ops.set_cpu_int8_activations(False)
    yield
    ops.set_cpu_int8_activations(True)
