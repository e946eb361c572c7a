"""fastllm.envs: values read when asked for, not at import; bad choices name the variable."""
import pytest

from fastllm import envs


def test_read_lazily(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLLM_CACHE", str(tmp_path))
    assert envs.FASTLLM_CACHE == tmp_path
    monkeypatch.delenv("FASTLLM_CACHE")
    assert envs.FASTLLM_CACHE.name == "fastllm" and envs.FASTLLM_CACHE.parent.name == ".cache"


def test_choice_checked(monkeypatch):
    monkeypatch.setenv("FASTLLM_PREFILL_BACKEND", "torch")
    assert envs.FASTLLM_PREFILL_BACKEND == "torch"
    monkeypatch.setenv("FASTLLM_PREFILL_BACKEND", "flash")
    with pytest.raises(ValueError, match="FASTLLM_PREFILL_BACKEND"):
        envs.FASTLLM_PREFILL_BACKEND


def test_unknown_name():
    with pytest.raises(AttributeError):
        envs.FASTLLM_NOT_A_VARIABLE
