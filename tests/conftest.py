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
