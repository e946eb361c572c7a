"""The runner contract a worker process will use: SchedulerOutput and RunnerOutput are
plain data. Every step's SchedulerOutput of a real engine (tiny random Llama on CPU),
pickled and run on a second ModelRunner built from the same checkpoint, gives back a
RunnerOutput equal to the in-process one -- sampled ids, logprobs, top logprobs -- over
prefill chunks, decodes, an n = 2 fork with its block copy, seeded random sampling with
penalties, preemption by swap, and finished requests the runner forgets."""
import pickle

import torch

from checkpoints import cached_checkpoint
from fastllm.config import EngineConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.engine.model_runner import ModelRunner
from fastllm.engine.step_data import RunnerOutput, SchedulerOutput
from fastllm.model.loader import load_for_engine
from fastllm.sampling_params import SamplingParams


def test_pickled_scheduler_output_runs_on_a_second_runner_to_the_same_result():
    path = cached_checkpoint("llama")
    config = EngineConfig(max_model_len=96, num_kv_blocks=14, block_size=8, max_num_batched_tokens=24,
                          swap_space=0.0005)
    engine = LLMEngine.from_pretrained(str(path), config, dtype="float32", device="cpu")
    loaded = load_for_engine(str(path), dtype="float32", device="cpu")
    worker = ModelRunner(loaded.model, loaded.config, config, device=loaded.device, dtype=loaded.dtype)
    assert worker.num_kv_blocks == engine.runner.num_kv_blocks
    assert worker.num_swap_blocks == engine.runner.num_swap_blocks > 0

    pairs = []
    execute = engine.runner.execute

    def mirrored(out: SchedulerOutput) -> RunnerOutput:
        wire = pickle.dumps(out)                 # before the local run: what it was sent
        here = execute(out)
        there = pickle.loads(pickle.dumps(worker.execute(pickle.loads(wire))))
        pairs.append((out, here, there))
        return here
    engine.runner.execute = mirrored

    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=rng).tolist() for n in (30, 9, 17, 5)]
    engine.add_request("greedy", prompts[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                            logprobs=3))
    engine.add_request("seeded", prompts[1], SamplingParams(
        temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=20, ignore_eos=True,
        repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logprobs=2))
    engine.add_request("fork", prompts[2], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12,
                                                          ignore_eos=True))
    engine.add_request("short", prompts[3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_swaps_out > 0            # the small cache made it swap
    assert any(out.blocks_to_copy for out, _, _ in pairs)
    assert any(out.finished_request_ids for out, _, _ in pairs)
    assert any(out.new_requests for out, _, _ in pairs[1:])     # admitted later too
    for out, here, there in pairs:
        assert there == here
        assert here.seq_ids == [s.seq_id for s in out.scheduled]
    # The worker forgets finished requests on the ids it is sent (one more step sends the last).
    engine.add_request("last", [5, 6, 7], SamplingParams(temperature=0, max_tokens=1))
    engine.step()
    assert len(worker.requests) == len(engine.runner.requests) == 1
