"""The server as a real process on a loopback port, on a tiny random-weight checkpoint.

One server per configuration, shared by the whole session (starting one takes seconds):
`server` (plain) and `limited_server` (--api-key, --max-queue-len, a small body limit).
"""
from __future__ import annotations

import os

import pytest

from checkpoints import cached_checkpoint
from server_process import API_KEY, MAX_MODEL_LEN, ServerProcess


@pytest.fixture(scope="session")
def model_path():
    return cached_checkpoint("llama")


@pytest.fixture(scope="session")
def server(model_path):
    proc = ServerProcess(model_path, "--num-kv-blocks", 256)
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.output()


@pytest.fixture(scope="session")
def limited_server(model_path):
    proc = ServerProcess(model_path, "--num-kv-blocks", 128, "--api-key", API_KEY,
                         "--max-queue-len", 2, "--max-request-bytes", 4096, "--max-logprobs", 3,
                         api_key=API_KEY)
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.output()


@pytest.fixture(scope="session")
def offline_llm(model_path):
    """fastllm's offline LLM on the same checkpoint: the reference for greedy text."""
    from fastllm import LLM
    return LLM(str(model_path), device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256)


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    """transformers' tokenizer of the checkpoint: an independent count of prompt tokens."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(str(model_path))


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
