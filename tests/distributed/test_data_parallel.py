"""Data parallelism on CPU: LLM(..., data_parallel_size=2) runs two engine replicas in
their own processes behind one front end. Checked against the single engine on the same
random-weight checkpoint (the reference), the replicas' own reports of what they ran,
hand-computed routing (4 * waiting + running, prefix affinity on ties), and the process
table (no replica outlives its front end)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams
from fastllm.engine.async_llm import RequestAbortedError
from fastllm.engine.dp_client import Placement, ReplicaDiedError, replica_placements

MAX_MODEL_LEN = 128
ENGINE = dict(device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, block_size=16)


def ids(seed: int, n: int) -> list[int]:
    """A prompt of n token ids whose first block no other seed shares."""
    return [3 + (seed * 37 + i * 11) % 380 for i in range(n)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def spawned_children(root: int = None) -> set[int]:
    """Live multiprocessing-spawned descendants (replicas, workers) of root (default: us)."""
    found = set()
    for child in psutil.Process(root).children(recursive=True):
        try:
            if (child.status() != psutil.STATUS_ZOMBIE
                    and any("spawn_main" in part for part in child.cmdline())):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def ran_on(llm, request_ids) -> dict:
    """request id -> the replica whose engine reported finishing it."""
    where = {}
    for index, stats in enumerate(llm.llm_engine.get_stats().replicas):
        for lat in stats.requests:
            if lat.request_id in request_ids:
                where[lat.request_id] = index
    return where


def step_until(client, condition, timeout: float = 60.0) -> list:
    outs, deadline = [], time.monotonic() + timeout
    while not condition(outs):
        assert time.monotonic() < deadline, "timed out stepping the engine"
        outs.extend(client.step())
    return outs


@pytest.fixture(scope="module")
def model_path():
    return str(cached_checkpoint("llama"))


@pytest.fixture(scope="module")
def single(model_path):
    return LLM(model_path, **ENGINE)


@pytest.fixture(scope="module")
def dp(model_path):
    llm = LLM(model_path, data_parallel_size=2, **ENGINE)
    pids = llm.llm_engine.replica_pids
    assert len(set(pids)) == 2 and all(not gone(p) for p in pids)
    yield llm
    llm.close()
    assert wait_gone(pids, timeout=5), "close() left a replica running"


def test_greedy_batch_equals_the_single_engine(dp, single):
    prompts = ["The capital of France is", "Hello world! How are", "Once upon a time",
               ids(1, 20), ids(2, 5), "0123456789"]
    params = SamplingParams(temperature=0, max_tokens=12)
    ref = single.generate(prompts, params, use_tqdm=False)
    got = dp.generate(prompts, params, use_tqdm=False)
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].text == r.outputs[0].text
        assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
        assert g.prompt_token_ids == r.prompt_token_ids
    # Added together, they alternate (scores 0,0 / 4,0 / 4,4 ...); each ran where routed.
    rids = [g.request_id for g in got]
    assert ran_on(dp, set(rids)) == {rid: i % 2 for i, rid in enumerate(rids)}


def test_seeded_sampling_n2_and_streaming_equal_the_single_engine(dp, single):
    params = SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=10)
    ref = single.generate([ids(3, 9)], params, use_tqdm=False)[0]
    got = dp.generate([ids(3, 9)], params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in ref.outputs]
    # Streaming: deltas from the client add up to the single engine's completion.
    prompt = "The quick brown fox"
    want = single.generate(prompt, SamplingParams(temperature=0, max_tokens=9),
                           use_tqdm=False)[0].outputs[0]
    client = dp.llm_engine
    client.add_request("stream-0", prompt, SamplingParams(temperature=0, max_tokens=9), delta=True)
    outs = step_until(client, lambda outs: not client.has_unfinished_requests())
    assert len(outs) >= 2 and outs[-1].finished
    assert "".join(o.outputs[0].text for o in outs) == want.text
    assert sum((o.outputs[0].token_ids for o in outs), []) == want.token_ids


def test_requests_spread_by_four_times_waiting_plus_running(dp):
    client = dp.llm_engine
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    client.add_request("a", ids(10, 8), long)       # (0,0): replica 0
    client.add_request("b", ids(11, 8), long)       # (4,0): replica 1
    seen = set()
    step_until(client, lambda outs: seen.update(o.request_id for o in outs) or {"a", "b"} <= seen)
    client.add_request("c", ids(12, 8), long)       # (1,1) tie, no shared prefix: replica 0
    seen.clear()
    step_until(client, lambda outs: seen.update(o.request_id for o in outs) or "c" in seen)
    client.abort_request("b")                       # replica 0 runs 2 (score 2), replica 1 none
    client.add_request("d", ids(13, 8), long)       # 0 < 2: replica 1, now 1 waiting = 4
    client.add_request("e", ids(14, 8), long)       # 2 running (2) < 1 waiting (4): replica 0
    assert [client.router.replica_of(r) for r in "acde"] == [0, 0, 1, 0]
    finished = {o.request_id for o in step_until(
        client, lambda outs: not client.has_unfinished_requests()) if o.finished}
    assert finished == set("acde")
    assert ran_on(dp, set("abcde")) == {"a": 0, "c": 0, "d": 1, "e": 0}


def test_shared_prefix_batch_stays_on_one_replica(dp):
    system = ids(20, 32)                            # two full KV blocks
    params = SamplingParams(temperature=0, max_tokens=4)
    warm = dp.generate([ids(21, 6), system + [5]], params, use_tqdm=False)
    assert ran_on(dp, {warm[1].request_id}) == {warm[1].request_id: 1}    # 0 was busier
    hits_before = dp.llm_engine.get_stats().replicas[1].prefix_cache_hit_rate
    # Each shared-prefix prompt meets a tie (0,0 then 4,4 ...) and follows the prefix to
    # replica 1; the others fill replica 0.
    batch = [system + [6, 7], ids(22, 6), system + [8], ids(23, 6), system + [9, 10, 11]]
    outs = dp.generate(batch, params, use_tqdm=False)
    where = ran_on(dp, {o.request_id for o in outs})
    assert [where[o.request_id] for o in outs] == [1, 0, 1, 0, 1]
    # The prefix really was cached there: replica 1's hit rate rose.
    assert dp.llm_engine.get_stats().replicas[1].prefix_cache_hit_rate > hits_before


def test_bad_requests_and_arguments_raise_value_error(dp, model_path):
    with pytest.raises(ValueError, match="max_model_len"):
        dp.generate([ids(30, 8), ids(31, MAX_MODEL_LEN)], SamplingParams(max_tokens=4),
                    use_tqdm=False)
    assert not dp.llm_engine.has_unfinished_requests()          # the good one was aborted
    with pytest.raises(ValueError, match="data_parallel_size"):
        LLM(model_path, data_parallel_size=0, **ENGINE)
    with pytest.raises(ValueError, match="device"):
        LLM(model_path, data_parallel_size=2, **{**ENGINE, "device": "cuda:1"})
    # The engine still serves after the refusal.
    assert dp.generate(ids(32, 4), SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_a_replica_startup_error_is_raised_and_nothing_is_left(model_path):
    before = spawned_children()
    # The model allows 256 positions: each replica's engine refuses while it builds.
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds"):
        LLM(model_path, data_parallel_size=2, **{**ENGINE, "max_model_len": 4096})
    assert spawned_children() <= before


def test_a_killed_replica_fails_its_requests_and_leaves_no_process(dp):
    """The last test on `dp` (it kills a replica; starting another pair costs seconds)."""
    llm = dp
    client = llm.llm_engine
    pids = client.replica_pids
    # As long as the model allows (8 + 116 < 128 positions): on0 must outlive the kill's detection.
    long = SamplingParams(temperature=0, max_tokens=116, ignore_eos=True)
    client.add_request("on0", ids(40, 8), long)
    client.add_request("on1", ids(41, 8), long)
    seen = set()
    step_until(client, lambda outs: seen.update(o.request_id for o in outs) or len(seen) == 2)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(ReplicaDiedError, match="replica 1 .* died"):
        step_until(client, lambda outs: False)
    assert client.get_unfinished_request_ids() == {"on0"}
    with pytest.raises(RequestAbortedError, match="replica 1"):
        client.add_request("late", ids(42, 8), long)
    # The survivor finishes what it holds, then stops by itself.
    outs = step_until(client, lambda outs: not client.has_unfinished_requests())
    final = [o for o in outs if o.finished]
    assert [o.request_id for o in final] == ["on0"]
    assert len(final[0].outputs[0].token_ids) == 116
    assert wait_gone(pids, timeout=30), "the surviving replica was not stopped"
    llm.close()
    assert not spawned_children() & set(pids)


def test_replica_placements_give_each_replica_its_own_gpus(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert replica_placements("auto", 2) == [Placement("cuda:0", "3"), Placement("cuda:0", "5")]
    # Two GPUs per (tensor-parallel) replica: each sees its pair as cuda:0 and cuda:1.
    assert replica_placements("cuda", 2, world_size=2) == [Placement("cuda", "3,5"),
                                                           Placement("cuda", "6,7")]
    with pytest.raises(ValueError, match="needs 6 GPUs but 4 are visible"):
        replica_placements("cuda", 3, world_size=2)
    with pytest.raises(ValueError, match="device='cuda:1'"):
        replica_placements("cuda:1", 2)
    assert replica_placements("cpu", 2) == [Placement("cpu"), Placement("cpu")]



def test_replica_stats_merge_into_totals():
    from fastllm.engine.dp_stats import merge_replica_stats
    from fastllm.engine.stats import EngineStats, RequestLatency

    def stats(running, waiting, total, used, slot_util, hit, prompt_tokens, rid):
        return EngineStats(num_running=running, num_waiting=waiting, num_swapped=0,
                           kv_blocks_total=total, kv_blocks_used=used,
                           kv_block_usage=used / total, kv_slot_utilization=slot_util,
                           prefix_cache_hit_rate=hit, num_preemptions=1, num_swaps_out=0,
                           num_prompt_tokens_computed=prompt_tokens, num_generation_tokens=5,
                           num_steps=7, requests=[RequestLatency(rid, 0.1, 0.01, 3)])
    a = stats(2, 1, 100, 30, 0.5, 0.25, 300, "a")
    b = stats(1, 3, 100, 10, 0.9, 0.75, 100, "b")
    m = merge_replica_stats([a, b])
    assert (m.num_running, m.num_waiting, m.kv_blocks_total, m.kv_blocks_used) == (3, 4, 200, 40)
    assert m.kv_block_usage == 40 / 200
    assert m.kv_slot_utilization == pytest.approx((0.5 * 30 + 0.9 * 10) / 40)      # by blocks used
    assert m.prefix_cache_hit_rate == pytest.approx((0.25 * 300 + 0.75 * 100) / 400)
    assert (m.num_preemptions, m.num_steps) == (2, 14)
    assert [r.request_id for r in m.requests] == ["a", "b"] and m.replicas == [a, b]
    assert "replica 1: running 1, waiting 3" in m.format()

# -- the server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dp_server(model_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from server_process import ServerProcess
    proc = ServerProcess(model_path, "--num-kv-blocks", 64, "--data-parallel-size", 2)
    yield proc
    proc.stop()


def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def replica_processes(server) -> list:
    """The server's replica processes."""
    return [psutil.Process(pid) for pid in spawned_children(server.proc.pid)]


def test_server_answers_the_openai_client(dp_server, single):
    client = openai_client(dp_server)
    prompt = "The capital of France is"
    want = single.generate(prompt, SamplingParams(temperature=0, max_tokens=12),
                           use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12,
                                     temperature=0)
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == len(want.token_ids)
    messages = [{"role": "user", "content": "Hello world!"}]
    chat_want = single.chat(messages, SamplingParams(temperature=0, max_tokens=10),
                            use_tqdm=False)[0].outputs[0]
    stream = client.chat.completions.create(model="tiny-llama", messages=messages,
                                            max_tokens=10, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == chat_want.text
    # A replica's refusal is still a 400 naming the limit (AsyncLLM waits for its answer).
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny-llama", prompt=ids(60, MAX_MODEL_LEN), max_tokens=4)
    assert refused.value.status_code == 400 and "max_model_len" in refused.value.message
    metrics = dp_server.metrics()
    for replica in ("0", "1"):
        assert f"fastllm:replica_num_requests_running{{replica={replica}}}" in metrics
        assert f"fastllm:replica_num_requests_waiting{{replica={replica}}}" in metrics
    assert metrics["fastllm:kv_cache_blocks_total"] == 2 * 64        # both replicas' pools
    assert metrics["fastllm:num_requests_running"] == 0


def test_server_fails_a_dead_replicas_requests_and_exits_clean(dp_server):
    openai = pytest.importorskip("openai")
    client = openai_client(dp_server)
    replicas = replica_processes(dp_server)
    assert len(replicas) == 2
    streams = [client.completions.create(model="tiny-llama", prompt=f"Once upon {i}",
                                         max_tokens=100, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}) for i in range(2)]
    chunks = [iter(s) for s in streams]
    for it in chunks:                  # both have a token: one runs on each replica
        next(it)
    replicas[0].kill()
    outcomes = []
    for it in chunks:
        try:
            n = 1 + sum(1 for _ in it)
            outcomes.append(("complete", n))
        except openai.APIError as e:
            outcomes.append(("error", str(e)))
    kinds = sorted(kind for kind, _ in outcomes)
    assert kinds == ["complete", "error"], outcomes
    error = next(detail for kind, detail in outcomes if kind == "error")
    assert "replica" in error and "died" in error
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=3)
    assert refused.value.status_code == 503
    assert "replica" in refused.value.body["message"]
    assert httpx.get(dp_server.url + "/health", timeout=5).status_code == 503
    pids = [p.pid for p in replicas]
    assert dp_server.stop() == 0, dp_server.output()
    assert wait_gone(pids, timeout=10)


def test_replica_loop_protocol_and_exit_when_the_front_end_goes(single):
    """The replica side in a thread, over real pipes, on the single engine: adds are
    answered in order (a refusal keeps its ValueError), outputs stream back, and closing
    the front end's end of the command pipe ends the loop (no replica outlives it)."""
    import multiprocessing
    import threading
    from fastllm.engine.dp_replica import ReplicaLoop
    cmd_recv, cmd_send = multiprocessing.Pipe(duplex=False)
    ev_recv, ev_send = multiprocessing.Pipe(duplex=False)
    ended = []

    def run():
        try:
            ReplicaLoop(single.llm_engine, cmd_recv, ev_send).run()
        except EOFError:
            ended.append("eof")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    # The reference first: from here on the thread owns the engine.
    want = single.generate(ids(50, 6), params, use_tqdm=False)[0].outputs[0].token_ids
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    cmd_send.send(("add", 0, "ok", None, ids(50, 6), params, True, time.time()))
    cmd_send.send(("add", 1, "bad", None, ids(51, MAX_MODEL_LEN), params, True, time.time()))
    events = []
    # Until both adds are answered and "ok" has finished (a fast step may finish it first).
    while not (sum(len(e[1]) for e in events if e[0] == "accepted") == 2 and any(
            e[0] == "outputs" and e[2] is not None and e[1] and e[1][-1].finished for e in events)):
        assert ev_recv.poll(30), events
        events.append(ev_recv.recv())
    assert events[0][0] == "accepted"
    # The loop answers the adds it has drained so far: the two may come in one event or two.
    accepted = [a for e in events if e[0] == "accepted" for a in e[1]]
    (seq0, ok, ok_error), (seq1, bad, bad_error) = accepted
    assert (seq0, ok, ok_error, seq1, bad) == (0, "ok", None, 1, "bad")
    assert isinstance(bad_error, ValueError) and "max_model_len" in str(bad_error)
    tokens = sum((o.outputs[0].token_ids for e in events if e[0] == "outputs" for o in e[1]), [])
    assert tokens == want
    cmd_send.close()
    thread.join(10)
    assert ended == ["eof"] and not single.llm_engine.has_unfinished_requests()
