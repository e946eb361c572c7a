"""How a model splits over a replica's ranks: which heads, rows and layers each rank holds.

Tensor parallelism (tp ranks) splits every layer: q heads, the intermediate size and the
(padded) vocabulary evenly; KV heads evenly when num_kv_heads >= tp, else each rank holds
the one KV head its q heads read (replicated on tp / num_kv_heads ranks). Pipeline
parallelism (pp stages) gives each stage a run of whole layers, uneven when they do not
divide (partition_layers; FASTLLM_PP_LAYER_PARTITION overrides).

validate_parallel checks all of it on the config alone, before any worker starts.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from fastllm import envs
from fastllm.config import ModelConfig, ParallelConfig
from fastllm.utils import cdiv


class HeadSplit(NamedTuple):
    """One TP rank's attention heads: q heads [q_start, q_start + num_heads), KV heads
    [kv_start, kv_start + num_kv_heads) of the checkpoint's."""
    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def head_split(config: ModelConfig, tp_size: int, tp_rank: int) -> HeadSplit:
    heads = config.num_attention_heads // tp_size
    kv = config.num_key_value_heads
    if kv >= tp_size:
        local_kv = kv // tp_size
        return HeadSplit(heads, local_kv, tp_rank * heads, tp_rank * local_kv)
    # Fewer KV heads than ranks: the KV head of this rank's q heads (tp % kv == 0, so a
    # rank's q heads all share one KV head).
    group = config.num_attention_heads // kv           # q heads per KV head
    return HeadSplit(heads, 1, tp_rank * heads, tp_rank * heads // group)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of tp (each rank the same number of rows)."""
    return cdiv(vocab_size, tp_size) * tp_size


def partition_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Each stage's layers [start, stop). FASTLLM_PP_LAYER_PARTITION="3,2" gives the
    counts; by default as even as possible, the extra layers on the first stages (the
    last one also runs the final norm and the LM head)."""
    override = envs.FASTLLM_PP_LAYER_PARTITION
    if override is not None:
        counts = _parse_partition(override, num_layers, pp)
    else:
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if s < extra else 0) for s in range(pp)]
        if base == 0:
            raise ValueError(f"num_hidden_layers={num_layers} cannot be split over "
                             f"pipeline_parallel_size={pp} stages (each needs a layer)")
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def _parse_partition(text: str, num_layers: int, pp: int) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"FASTLLM_PP_LAYER_PARTITION={text!r}: expected comma-separated "
                         f"layer counts, e.g. '3,2'") from None
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"FASTLLM_PP_LAYER_PARTITION={text!r}: needs {pp} positive counts "
                         f"(pipeline_parallel_size) summing to num_hidden_layers={num_layers}")
    return counts


def validate_parallel(model_config: ModelConfig, parallel_config: ParallelConfig) -> None:
    """ValueError naming the numbers when the model cannot be split as asked."""
    c, tp, pp = model_config, parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size
    if c.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads={c.num_attention_heads} is not divisible by "
                         f"tensor_parallel_size={tp}")
    kv = c.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"num_key_value_heads={kv} cannot be split over tensor_parallel_size="
                         f"{tp}: one must be a multiple of the other")
    if c.intermediate_size % tp:
        raise ValueError(f"intermediate_size={c.intermediate_size} is not divisible by "
                         f"tensor_parallel_size={tp}")
    if c.num_hidden_layers < pp:
        raise ValueError(f"num_hidden_layers={c.num_hidden_layers} is fewer than "
                         f"pipeline_parallel_size={pp} (each stage needs a layer)")
    partition_layers(c.num_hidden_layers, pp)          # the override's own checks


def local_model_config(config: ModelConfig, tp_size: int, tp_rank: int, pp_size: int,
                       pp_rank: int) -> ModelConfig:
    """What one rank's KV cache and attention see: its heads, its stage's layers (the
    vocabulary and every other field as the checkpoint's)."""
    heads = head_split(config, tp_size, tp_rank)
    start, stop = partition_layers(config.num_hidden_layers, pp_size)[pp_rank]
    return dataclasses.replace(config, num_attention_heads=heads.num_heads,
                               num_key_value_heads=heads.num_kv_heads,
                               num_hidden_layers=stop - start)
