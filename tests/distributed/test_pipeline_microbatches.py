"""ModelRunner.begin / finish on 2 pipeline stages (spawned gloo ranks): two steps begun
before the first is finished (exec's microbatches) sample what one process sampling them
in turn does, and only the driver returns tokens."""
from __future__ import annotations

import random

import torch.distributed as dist

from checkpoints import cached_checkpoint
from fastllm.config import EngineConfig, ParallelConfig
from fastllm.engine.step_data import NewRequest, ScheduledSeq, SchedulerOutput
from fastllm.sampling_params import SamplingParams
from parallel_ranks import run_ranks

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def _runner(path, parallel=None):
    from fastllm.engine.model_runner import ModelRunner
    from fastllm.model.loader import load_for_engine
    loaded = load_for_engine(path, dtype="float32", device="cpu", parallel=parallel)
    config = EngineConfig(num_kv_blocks=16, block_size=8, max_model_len=64)
    config.resolve_max_model_len(loaded.config)
    return ModelRunner(loaded.model, loaded.config, config, device=loaded.device,
                       dtype=loaded.dtype, parallel=parallel)


def _prefill(rid: str, seq_id: int, prompt: list[int], blocks: list[int]) -> SchedulerOutput:
    return SchedulerOutput(scheduled=[ScheduledSeq(rid, seq_id, prompt, 0, blocks, 1, 0, None)],
                           new_requests=[NewRequest(rid, prompt, GREEDY)])


def _decode(prompts, blocks, tokens) -> SchedulerOutput:
    """Both sequences' next token in one step."""
    return SchedulerOutput(scheduled=[
        ScheduledSeq(rid, i, [tokens[i]], len(prompts[i]), blocks[i], 1, 1, None)
        for i, rid in enumerate(("a", "b"))])


def _token(result) -> int:
    return result.sampled[0][0].token_id


def _steps():
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (11, 6)]
    return prompts, [[0, 1], [2, 3]]


def _rank(rank, world_size, path):
    from fastllm.distributed.parallel_state import init_parallel_context
    runner = _runner(path, init_parallel_context(ParallelConfig(1, 2), "cpu"))
    prompts, blocks = _steps()
    step_a, step_b = _prefill("a", 0, prompts[0], blocks[0]), _prefill("b", 1, prompts[1], blocks[1])
    runner.begin(step_a)                  # both in flight on the stages before either is sampled
    runner.begin(step_b)
    results = [runner.finish(step_a), runner.finish(step_b)]
    box = [[_token(r) for r in results] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)                # the driver's tokens schedule the decode
    results.append(runner.execute(_decode(prompts, blocks, box[0])))
    return [[[t.token_id for t in seq] for seq in r.sampled] for r in results]


def test_two_steps_in_flight_sample_what_one_process_samples():
    path = str(cached_checkpoint("llama", num_hidden_layers=3))
    driver, worker = run_ranks(_rank, 2, path)
    single = _runner(path)
    prompts, blocks = _steps()
    first = [single.execute(_prefill("a", 0, prompts[0], blocks[0])),
             single.execute(_prefill("b", 1, prompts[1], blocks[1]))]
    decode = single.execute(_decode(prompts, blocks, [_token(r) for r in first]))
    expected = [[[t.token_id for t in seq] for seq in r.sampled] for r in first + [decode]]
    assert driver == expected
    assert worker == [[], [], []]                          # only the driver samples
