"""LLM(tensor_parallel_size=2) on CPU with gloo: spawned workers in lockstep with the driver,
the same greedy tokens as one process, every worker gone after close(); a model that
cannot be split is refused before anything is spawned."""
from __future__ import annotations

import psutil
import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams

PROMPTS = ["Hello world", [1, 2, 3, 4, 5, 6, 7], "How are you today?", [9] * 20]


def worker_processes() -> list[psutil.Process]:
    """This process's live spawned children (not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and "resource_tracker" not in " ".join(p.cmdline())]


def greedy(llm, max_tokens=10):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model_path():
    return str(cached_checkpoint("llama"))


def test_tp2_matches_single_process_and_cleans_up(model_path):
    # A cache of 12 blocks of 4 tokens cannot hold the four sequences at once: the same
    # preemptions must happen on every rank for the tokens to match.
    kw = dict(device="cpu", max_model_len=64, block_size=4, num_kv_blocks=12, seed=0)
    single = LLM(model_path, **kw)
    expected = greedy(single)
    single.close()
    before = {p.pid for p in worker_processes()}

    llm = LLM(model_path, tensor_parallel_size=2, **kw)
    try:
        spawned = [p for p in worker_processes() if p.pid not in before]
        assert len(spawned) == 1                      # world 2 = the driver + one worker
        assert greedy(llm) == expected
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert llm.llm_engine.block_manager.num_blocks == 12
        assert greedy(llm) == expected                # lockstep holds across generate calls
    finally:
        llm.close()
    psutil.wait_procs(spawned, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in spawned)


def test_unsplittable_model_refused_before_spawning(model_path):
    before = {p.pid for p in worker_processes()}
    with pytest.raises(ValueError, match="num_attention_heads=4 .*tensor_parallel_size=3"):
        LLM(model_path, tensor_parallel_size=3, device="cpu", max_model_len=64)
    assert {p.pid for p in worker_processes()} == before


def test_bad_parallel_sizes_name_the_field(model_path):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(model_path, pipeline_parallel_size=0, device="cpu")


@pytest.mark.skipif(not hasattr(__import__("fastllm.engine.model_runner", fromlist=["x"]).ModelRunner, "begin"),
                    reason="needs the pipeline-parallel runner (ModelRunner.begin / finish)")
def test_pp2_microbatches_match_single_process():
    # 3 layers: an uneven split over the stages. A small cache preempts in flight.
    path = str(cached_checkpoint("llama", num_hidden_layers=3))
    kw = dict(device="cpu", max_model_len=64, block_size=4, num_kv_blocks=14)
    single = LLM(path, **kw)
    expected = greedy(single)
    single.close()
    llm = LLM(path, pipeline_parallel_size=2, **kw)
    try:
        assert llm.llm_engine.executor.max_concurrent_batches == 2
        assert greedy(llm) == expected
        # Two microbatches per token: the sequences were split between the steps in flight.
        assert llm.llm_engine.num_steps > 10
    finally:
        llm.close()


def test_garbage_collected_llm_stops_its_workers(model_path):
    import gc
    before = {p.pid for p in worker_processes()}
    llm = LLM(model_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
    spawned = [p for p in worker_processes() if p.pid not in before]
    del llm
    gc.collect()
    psutil.wait_procs(spawned, timeout=10)
    assert spawned and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in spawned)
    # The process group went with it: a new parallel LLM starts in this process.
    again = LLM(model_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
    again.close()
