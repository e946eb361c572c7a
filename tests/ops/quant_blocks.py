"""Random GGUF weight blocks for the quantized-kernel tests: every byte random (all bit
patterns of the packed quants and scales), the fp16 scale fields set to sane values."""
import numpy as np
import torch

from fastllm import reference

# name -> ggml type id
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
FLOAT_TYPES = {"F32": 0, "F16": 1, "BF16": 30}
# byte offsets of each type's fp16 scale fields (d, and m/dmin where present)
_HALF_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def random_blocks(ggml_type: int, rows: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """uint8 [rows, row_bytes]: a weight in `ggml_type`'s blocks."""
    rng = np.random.default_rng(seed)
    if ggml_type in FLOAT_TYPES.values():
        w = torch.from_numpy(rng.standard_normal((rows, in_features)).astype(np.float32))
        dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[ggml_type]
        return w.to(dtype).view(torch.uint8).reshape(rows, -1).contiguous()
    block_elems, block_bytes = reference.GGML_BLOCKS[ggml_type]
    raw = rng.integers(0, 256, size=(rows, in_features // block_elems, block_bytes), dtype=np.uint8)
    for offset in _HALF_FIELDS[ggml_type]:
        scale = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def gguf_dequantize(weight: torch.Tensor, ggml_type: int) -> np.ndarray:
    """The `gguf` package's dequantization: the independent oracle."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(weight.numpy(), GGMLQuantizationType(ggml_type)).astype(np.float64)
