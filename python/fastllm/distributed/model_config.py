"""A model's ModelConfig read without its weights, and the check that it splits as asked:
both run in the driver before any worker is spawned."""
from __future__ import annotations

import os

from fastllm.config import ModelConfig, ParallelConfig


def read_model_config(path) -> ModelConfig:
    """config.json of an HF directory, or a GGUF file's metadata."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isfile(path):
        from fastllm.model.gguf_loader import config_from_gguf, open_gguf
        return config_from_gguf(open_gguf(path), path)
    return ModelConfig.from_hf_dir(path)


def validate_parallel(model_config: ModelConfig, parallel_config: ParallelConfig) -> None:
    """ValueError naming the numbers when the model cannot be split as asked: the model
    side's own check (fastllm.distributed.sharding) once it is there, else the basics."""
    try:
        from fastllm.distributed.sharding import validate_parallel as model_side_check
    except ImportError:
        model_side_check = _basic_check
    model_side_check(model_config, parallel_config)


def _basic_check(c: ModelConfig, parallel_config: ParallelConfig) -> None:
    tp, pp = parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size
    if c.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads={c.num_attention_heads} is not divisible by "
                         f"tensor_parallel_size={tp}")
    if c.num_hidden_layers < pp:
        raise ValueError(f"num_hidden_layers={c.num_hidden_layers} is fewer than "
                         f"pipeline_parallel_size={pp} (each stage needs a layer)")
