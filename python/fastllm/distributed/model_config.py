"""A model's ModelConfig read without its weights, in the driver before any worker is
spawned (fastllm.distributed.sharding.validate_parallel then checks that it splits)."""
from __future__ import annotations

import os

from fastllm.config import ModelConfig


def read_model_config(path) -> ModelConfig:
    """config.json of an HF directory, or a GGUF file's metadata."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isfile(path):
        from fastllm.model.gguf_loader import config_from_gguf, open_gguf
        return config_from_gguf(open_gguf(path), path)
    return ModelConfig.from_hf_dir(path)
