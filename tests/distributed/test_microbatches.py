"""Pipeline microbatches, engine and scheduler side: with two steps in flight the
scheduler never puts a sequence in both, every block move lands in order, and the outputs
are the plain Python reference's under chunking, prefix caching, forks, preemption by
recompute and by swap, and aborts of requests in flight. The executor here runs each
step when it is collected (one stage), which keeps the same order of KV writes as a real
pipeline's stages: the fake model of tests/engine checks every write and read."""
from __future__ import annotations

import random

import pytest
import torch

from engine.fake_engine import (EOS, VOCAB, FakeModel, FakeTokenizer, assert_clean,
                                random_prompts, reference_generate, run_all)
from fastllm.config import EngineConfig, ModelConfig
from fastllm.distributed.executor import UniprocExecutor
from fastllm.engine.llm_engine import LLMEngine
from fastllm.engine.model_runner import ModelRunner
from fastllm.sampling_params import SamplingParams


class TwoInFlight(UniprocExecutor):
    """Two steps in flight; records which sequences each holds."""
    max_concurrent_batches = 2

    def __init__(self, runner):
        super().__init__(runner)
        self.in_flight: list[set[int]] = []
        self.max_depth = 0

    def submit(self, sched):
        ids = {s.seq_id for s in sched.scheduled}
        for other in self.in_flight:
            assert not ids & other, f"sequences {ids & other} are in two steps in flight"
        self.in_flight.append(ids)
        self.max_depth = max(self.max_depth, sum(1 for f in self.in_flight if f))
        super().submit(sched)

    def collect(self, sched):
        assert self.in_flight.pop(0) == {s.seq_id for s in sched.scheduled}
        return super().collect(sched)


def make_pipelined_engine(**kw):
    model_config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=8,
                               intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                               num_key_value_heads=1, head_dim=2, max_position_embeddings=512)
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 64)
    config = EngineConfig(**kw)
    config.resolve_max_model_len(model_config)
    runner = ModelRunner(FakeModel(), model_config, config, device=torch.device("cpu"),
                         dtype=torch.float32, valid_vocab_size=VOCAB)
    return LLMEngine(None, model_config, config, FakeTokenizer(), device=torch.device("cpu"),
                     dtype=torch.float32, executor=TwoInFlight(runner))


SETTINGS = [
    dict(),
    dict(num_kv_blocks=24),                                          # preemption by recompute
    dict(num_kv_blocks=24, swap_space=0.001),                        # preemption by swap
    dict(max_num_batched_tokens=8, num_kv_blocks=20, enable_prefix_caching=False),
    dict(max_num_seqs=3, num_kv_blocks=30, swap_space=0.001, max_num_batched_tokens=8),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_two_steps_in_flight_match_reference(settings):
    rng = random.Random(1)
    engine = make_pipelined_engine(max_model_len=64, **settings)
    system = [rng.randrange(3, VOCAB) for _ in range(9)]
    prompts = random_prompts(24, rng) + [system + p[:10] for p in random_prompts(8, rng)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 16)) for _ in prompts]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    finished = run_all(engine)
    assert len(finished) == len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ref = reference_generate(p, sp.max_tokens)
        assert finished[str(i)].outputs[0].token_ids == ref, (i, settings)
    assert engine.executor.max_depth == 2          # the steps did overlap
    assert_clean(engine)
    if settings.get("num_kv_blocks", 64) <= 24:
        assert engine.get_stats().num_preemptions > 0


def test_forks_and_aborts_in_flight():
    rng = random.Random(2)
    engine = make_pipelined_engine(max_model_len=64, num_kv_blocks=40)
    prompts = random_prompts(10, rng, lo=5)
    for i, p in enumerate(prompts):
        n = 3 if i % 3 == 0 else 1
        engine.add_request(str(i), p, SamplingParams(n=n, temperature=0, max_tokens=12,
                                                     ignore_eos=True))
    finished = {}
    for _ in range(4):                              # both steps in flight by now
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    aborted = {"1", "4", "6"}
    engine.abort_request(sorted(aborted))
    finished.update(run_all(engine))
    for i, p in enumerate(prompts):
        if str(i) in aborted:
            continue
        ref = reference_generate(p, 12, ignore_eos=True)
        assert all(c.token_ids == ref for c in finished[str(i)].outputs), i
    assert_clean(engine)
    # The runner forgot every request, the aborted ones too, once their steps were done
    # (a finished id reaches it with the next step: only "last" may be left).
    engine.add_request("last", [5, 6], SamplingParams(max_tokens=1))
    run_all(engine)
    assert len(engine.runner.requests) <= 1
