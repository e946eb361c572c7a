"""GGUF weights kept as stored (quantization="gguf"): the model built on QuantLinear gives
the logits of the same file dequantized at load (quantization=None), for every block type
the test converter writes, fused projections mixing types, tied and untied LM heads."""
from __future__ import annotations

import pytest
import torch

from checkpoints import write_checkpoint, write_gguf
from fastllm.model.loader import load_model, resolve_quantization
from fastllm.model.quant_linear import QuantLinear
from tests.model.test_loader import prefill_logits, rel_err

pytest.importorskip("gguf")

CASES = [("llama", "F32"), ("llama", "F16"), ("llama", "Q8_0"), ("llama", "Q5_0"), ("llama-tied", "mixed"),
         ("qwen2", "Q4_0"), ("llama", "multi")]


def _gguf(tmp_path, arch, tensor_type):
    if arch == "llama-tied":
        hf = write_checkpoint(tmp_path / "hf", "llama", tie_word_embeddings=True, rope_scaling=None, seed=5)
    else:
        hf = write_checkpoint(tmp_path / "hf", arch, seed=5)
    return write_gguf(hf, tmp_path / "model.gguf", tensor_type)


@pytest.mark.parametrize("arch,tensor_type", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_quantized_model_matches_dequantized(tmp_path, fp32_activations, arch, tensor_type):
    """The kept blocks multiply as the dequantized weights do, with fp32 activations (the
    int8 rounding of x, on by default, is checked kernel by kernel in tests/ops)."""
    path = _gguf(tmp_path, arch, tensor_type)
    quant, config = load_model(path, quantization="gguf")
    plain, _ = load_model(path, quantization=None)
    attn, mlp = quant.layers[0].self_attn, quant.layers[0].mlp
    for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj, quant.lm_head):
        assert isinstance(linear, QuantLinear)
    if tensor_type == "multi":  # q F16 | k Q4_0 | v Q8_0; gate|up one Q4_0 segment
        assert attn.qkv_proj.ggml_types == [1, 2, 8] and mlp.gate_up_proj.ggml_types == [2]
    if config.attention_bias:
        assert attn.qkv_proj.bias is not None and attn.qkv_proj.bias.abs().sum() > 0
    ours, want = prefill_logits(quant, config), prefill_logits(plain, config)
    assert rel_err(ours, want) < 1e-4


def test_quantization_choice_and_errors(tmp_path):
    assert resolve_quantization("auto", True) == "gguf" and resolve_quantization("auto", False) is None
    assert resolve_quantization(None, True) is None
    with pytest.raises(ValueError, match="quantization"):
        resolve_quantization("awq", True)
    hf = write_checkpoint(tmp_path / "hf", "llama")
    with pytest.raises(ValueError, match="quantization='gguf' needs a .gguf"):
        load_model(hf, quantization="gguf")


def test_raw_blocks_checks_shape(tmp_path):
    from fastllm.model.gguf_loader import open_gguf
    from fastllm.model.gguf_quant import raw_blocks
    path = _gguf(tmp_path, "llama", "Q8_0")
    tensor = next(t for t in open_gguf(path).tensors if t.name == "blk.0.ffn_down.weight")
    blocks = raw_blocks(tensor, (64, 128), str(path))
    assert blocks.dtype == torch.uint8 and blocks.shape == (64, 128 // 32 * 34)
    with pytest.raises(ValueError, match="blk.0.ffn_down.weight.*expected \\(64, 96\\)"):
        raw_blocks(tensor, (64, 96), str(path))


def test_quant_linear_module_rejects_bad_segments():
    with pytest.raises(ValueError, match="segment 0"):
        QuantLinear(64, [(3, torch.zeros(4, 10, dtype=torch.uint8))])
    with pytest.raises(ValueError, match="ggml_type"):
        QuantLinear(64, [(99, torch.zeros(4, 40, dtype=torch.uint8))])
