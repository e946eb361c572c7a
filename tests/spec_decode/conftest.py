import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import cached_checkpoint


def noisy_copy(src, dst, noise: float, seed: int = 3):
    """A copy of checkpoint `src` with every tensor perturbed by noise * its std: a draft
    model that agrees with the target often but not always (same vocabulary)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(f"{dst}/model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def noisy_draft(tmp_path_factory):
    """arch -> path of a perturbed copy of cached_checkpoint(arch)."""
    made = {}

    def get(arch="llama"):
        if arch not in made:
            made[arch] = noisy_copy(cached_checkpoint(arch), tmp_path_factory.mktemp(f"draft-{arch}"), 0.03)
        return str(made[arch])
    return get
