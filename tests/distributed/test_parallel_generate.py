"""TP=2, PP=2 and TP=2 x PP=2 greedy generations token-identical to TP=1, on spawned gloo
ranks: rank 0 runs the engine and broadcasts each step's SchedulerOutput, the other ranks
run a ModelRunner on it (the test's stand-in for the worker loop).

Cases: Llama GQA, Llama with 1 KV head (replicated over the TP ranks), an odd vocabulary
(padded to a multiple of tp), Qwen2 (qkv bias, tied embeddings), an uneven pipeline split
(3 layers on 2 stages), and a KV cache small enough to preempt (recompute, swap).
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from checkpoints import cached_checkpoint
from fastllm.config import EngineConfig, ParallelConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams
from parallel_ranks import run_ranks

MAX_NEW = 6
TINY_CACHE = dict(num_kv_blocks=8, block_size=8)             # preempts these prompts
TINY_CACHE_SWAP = dict(TINY_CACHE, swap_space=0.001)         # ... into swap space

CASES = {
    "llama_gqa": ("llama", {}, {}),
    "llama_kv1": ("llama", {"num_key_value_heads": 1}, {}),
    "llama_odd_vocab": ("llama", {"vocab_size": 383}, {}),
    "qwen2_bias_tied": ("qwen2", {}, {}),
    "llama_preempt": ("llama", {}, TINY_CACHE),
    "llama_3_layers": ("llama", {"num_hidden_layers": 3}, {}),
    "qwen2_kv1_odd_preempt": ("qwen2", {"num_key_value_heads": 1, "vocab_size": 383}, TINY_CACHE_SWAP),
}
LAYOUTS = {  # (tp, pp) -> the cases run on one group of spawned ranks
    (2, 1): ["llama_gqa", "llama_kv1", "llama_odd_vocab", "qwen2_bias_tied", "llama_preempt"],
    (1, 2): ["llama_3_layers", "qwen2_bias_tied", "llama_preempt"],
    (2, 2): ["qwen2_kv1_odd_preempt", "llama_3_layers"],
}


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17, 30, 9, 41)]


def _engine_config(extra: dict) -> EngineConfig:
    return EngineConfig(max_model_len=128, **extra)


def _generate(engine, prompts) -> tuple[list, int]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    return [outs[str(i)] for i in range(len(prompts))], engine.get_stats().num_preemptions


def _driver(ctx, path, extra, prompts):
    engine = LLMEngine.from_pretrained(path, _engine_config(extra), dtype="float32", device="cpu",
                                       parallel=ctx)
    execute = engine.runner.execute

    def broadcast_then_execute(out):
        dist.broadcast_object_list([out], src=0)
        return execute(out)

    engine.runner.execute = broadcast_then_execute
    try:
        return _generate(engine, prompts)
    finally:
        dist.broadcast_object_list([None], src=0)         # the workers' loop ends


def _worker(ctx, path, extra):
    from fastllm.engine.model_runner import ModelRunner
    from fastllm.model.loader import load_for_engine
    loaded = load_for_engine(path, dtype="float32", device="cpu", parallel=ctx)
    config = _engine_config(extra)
    config.resolve_max_model_len(loaded.config)
    runner = ModelRunner(loaded.model, loaded.config, config, device=loaded.device,
                         dtype=loaded.dtype, parallel=ctx)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        assert runner.execute(box[0]).seq_ids == []      # only the driver returns tokens


def _rank(rank, world_size, tp, pp, cases):
    from fastllm.distributed.parallel_state import init_parallel_context
    ctx = init_parallel_context(ParallelConfig(tp, pp), "cpu")
    results = {}
    for name, path, extra, prompts in cases:
        if rank == 0:
            results[name] = _driver(ctx, path, extra, prompts)
        else:
            _worker(ctx, path, extra)
    return results


def _case(name):
    arch, overrides, extra = CASES[name]
    path = str(cached_checkpoint(arch, **overrides))
    prompts = _prompts(overrides.get("vocab_size", 384))
    return name, path, extra, prompts


@pytest.mark.parametrize("tp, pp", list(LAYOUTS), ids=[f"tp{t}_pp{p}" for t, p in LAYOUTS])
def test_parallel_greedy_matches_single_rank(tp, pp):
    cases = [_case(name) for name in LAYOUTS[(tp, pp)]]
    results = run_ranks(_rank, tp * pp, tp, pp, cases)[0]
    for name, path, extra, prompts in cases:
        single = LLMEngine.from_pretrained(path, _engine_config(extra), dtype="float32", device="cpu")
        want, preemptions = _generate(single, prompts)
        got, parallel_preemptions = results[name]
        assert got == want, name
        assert all(len(t) == MAX_NEW for t in got), name
        if extra:
            assert preemptions > 0 and parallel_preemptions > 0, name
