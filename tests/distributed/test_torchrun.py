"""torchrun across two local "nodes" (--nnodes 2 --nproc-per-node 1, static rendezvous on
127.0.0.1): rank 0 serves HTTP, rank 1 only computes; a request goes end to end through
the official openai client with the single-process greedy text, and stopping the server
ends both nodes cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import pytest

from checkpoints import cached_checkpoint
from serve.server_process import free_port


def torchrun_node(node_rank: int, master_port: int, http_port: int, model_path: str, log):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
           "--master-addr", "127.0.0.1", "--master-port", str(master_port),
           "-m", "fastllm.serve", "--model", model_path, "--device", "cpu",
           "--tensor-parallel-size", "2", "--port", str(http_port), "--max-model-len", "128",
           "--served-model-name", "tiny-llama"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, procs, log, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a torchrun node exited with {p.returncode}:\n{read(log)}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server did not come up:\n{read(log)}")


def read(log) -> str:
    log.flush()
    with open(log.name) as f:
        return f.read()


def test_two_node_torchrun_serves_through_openai():
    openai = pytest.importorskip("openai")
    from fastllm import LLM, SamplingParams
    model_path = str(cached_checkpoint("llama"))
    reference = LLM(model_path, device="cpu", max_model_len=128)
    expected = reference.generate("Hello world", SamplingParams(temperature=0, max_tokens=8,
                                                                ignore_eos=True),
                                  use_tqdm=False)[0].outputs[0].text
    reference.close()

    master_port, http_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="fastllm-torchrun-", suffix=".log")
    nodes = [torchrun_node(r, master_port, http_port, model_path, log) for r in (0, 1)]
    ranks = []
    try:
        wait_healthy(url, nodes, log)
        ranks = [c for n in nodes for c in psutil.Process(n.pid).children(recursive=True)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="tiny-llama", prompt="Hello world", max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected
        assert out.usage.completion_tokens == 8
        # Stop the server (rank 0): its shutdown tells rank 1 to exit; both nodes end 0.
        server = psutil.Process(nodes[0].pid).children()[0]
        server.send_signal(signal.SIGTERM)
        for n in nodes:
            assert n.wait(60) == 0, read(log)
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    psutil.wait_procs(ranks, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), read(log)
