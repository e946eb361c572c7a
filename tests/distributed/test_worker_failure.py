"""A worker killed mid-generation: the driver fails every request in flight within
seconds with an error naming the worker, later calls fail at once, and no child process
survives -- offline (LLM.generate raises) and behind the server (5xx OpenAI error bodies,
/health turns 503)."""
from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams
from fastllm.distributed.executor import WorkerFailedError
from test_executor import worker_processes


@pytest.fixture(scope="module")
def model_path():
    return str(cached_checkpoint("llama"))


def test_killed_worker_fails_generate(model_path):
    before = {p.pid for p in worker_processes()}
    llm = LLM(model_path, tensor_parallel_size=2, device="cpu", max_model_len=128)
    worker = next(p for p in worker_processes() if p.pid not in before)
    engine = llm.llm_engine
    execute, steps = engine.executor.runner.execute, []

    def execute_then_kill(sched):             # the driver's half of each step
        steps.append(1)
        if len(steps) == 3:                   # mid-generation: prefill and a decode done
            os.kill(worker.pid, signal.SIGKILL)
        return execute(sched)

    engine.executor.runner.execute = execute_then_kill
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match=rf"worker rank 1 \(pid {worker.pid}\) was killed by signal SIGKILL"):
        llm.generate(["Hello world", [5, 6, 7]], params, use_tqdm=False)
    assert time.monotonic() - start < 10
    assert len(steps) < 100                   # it stopped at the failure, not at max_tokens
    assert not engine.has_unfinished_requests()
    assert not engine.is_healthy
    with pytest.raises(WorkerFailedError):    # the group is gone: later calls fail at once
        llm.generate("again", params, use_tqdm=False)
    llm.close()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert {p.pid for p in worker_processes()} <= before


def test_killed_worker_behind_the_server(model_path):
    from serve.server_process import ServerProcess
    openai = pytest.importorskip("openai")
    server = ServerProcess(model_path, "--tensor-parallel-size", 2)
    try:
        workers = psutil.Process(server.proc.pid).children(recursive=True)
        workers = [p for p in workers if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 1
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        ok = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4)
        assert ok.choices[0].text
        os.kill(workers[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/health stayed 200 after the worker died"
            time.sleep(0.2)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4)
        assert e.value.status_code in (500, 503)
        assert "worker rank 1" in e.value.body["message"]
    finally:
        server.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_hung_worker_times_out_the_step(model_path, monkeypatch):
    """A stopped (SIGSTOP) worker never answers the collective the driver's step waits in
    -- as a TP all_reduce would -- so the step times out: the worker is killed, the
    request fails with the timeout named."""
    import torch
    import torch.distributed as dist
    monkeypatch.setenv("FASTLLM_STEP_TIMEOUT", "4")
    before = {p.pid for p in worker_processes()}
    llm = LLM(model_path, tensor_parallel_size=2, device="cpu", max_model_len=128)
    worker = next(p for p in worker_processes() if p.pid not in before)
    runner = llm.llm_engine.executor.runner
    execute = runner.execute

    def execute_waiting_on_worker(sched):
        worker.suspend()
        dist.all_reduce(torch.ones(1))        # the worker never joins it
        return execute(sched)

    runner.execute = execute_waiting_on_worker
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="FASTLLM_STEP_TIMEOUT=4"):
        llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 30
    assert not llm.llm_engine.has_unfinished_requests()
    llm.close()
    psutil.wait_procs([worker], timeout=10)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
