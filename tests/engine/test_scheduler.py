"""Scheduler + block manager, driven through LLMEngine with the fake model of
fake_engine.py: outputs checked against a plain Python reference under every schedule
(chunks, prefix caching, forks, preemption by recompute and by swap, aborts, failed
steps), plus the update primitives (advance by k tokens, rollback) and close()."""
import random

import pytest

from fake_engine import (EOS, VOCAB, FakeModel, assert_clean, make_engine, random_prompts,
                         reference_generate, run_all)
from fastllm import reference
from fastllm.engine.sequence import SequenceStatus
from fastllm.sampling_params import SamplingParams


SETTINGS = [
    dict(),                                                          # roomy cache
    dict(num_kv_blocks=24),                                          # preemption by recompute
    dict(num_kv_blocks=24, swap_space=0.001),                        # preemption by swap
    dict(max_num_batched_tokens=8),                                  # 8-token chunks
    dict(max_num_batched_tokens=8, num_kv_blocks=20, enable_prefix_caching=False),
    dict(max_num_seqs=1),
    dict(max_num_seqs=3, num_kv_blocks=30, swap_space=0.001, max_num_batched_tokens=8),
    dict(enable_chunked_prefill=False, max_num_batched_tokens=64, num_kv_blocks=24),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_outputs_match_reference_under_any_schedule(settings):
    rng = random.Random(0)
    engine = make_engine(max_model_len=64, **settings)
    system = [rng.randrange(3, VOCAB) for _ in range(9)]
    prompts = random_prompts(40, rng)
    prompts += [system + p[:10] for p in random_prompts(12, rng)]   # shared prefixes
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 16)) for _ in prompts]
    for i, (p, sp) in enumerate(zip(prompts[:30], params)):
        engine.add_request(str(i), p, sp)
    finished = {}
    # The rest arrive while the first ones run.
    pending = list(range(30, len(prompts)))
    while engine.has_unfinished_requests() or pending:
        if pending and rng.random() < 0.5:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], params[i])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished) == len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        out = finished[str(i)].outputs[0]
        ref = reference_generate(p, sp.max_tokens)
        assert out.token_ids == ref, (i, settings)
        assert out.finish_reason == ("stop" if ref[-1] == EOS else "length")
    assert_clean(engine)
    stats = engine.get_stats()
    if settings.get("num_kv_blocks", 64) <= 24:
        assert stats.num_preemptions > 0
        if settings.get("swap_space"):
            assert stats.num_swaps_out > 0


def test_python_allocator_fallback(monkeypatch):
    """Without fastllm._C the engine runs on the Python twin of the allocator."""
    from fastllm import ops, reference
    monkeypatch.setattr(ops, "BlockAllocator", reference.BlockAllocator)
    engine = make_engine(num_kv_blocks=20, swap_space=0.0005, max_num_batched_tokens=12,
                         max_model_len=64)
    assert isinstance(engine.block_manager.allocator, reference.BlockAllocator)
    rng = random.Random(3)
    prompts = random_prompts(30, rng) + [[9] * 12 + p for p in random_prompts(10, rng, hi=8)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12))
    finished = run_all(engine)
    for i, p in enumerate(prompts):
        assert finished[str(i)].outputs[0].token_ids == reference_generate(p, 12)
    assert engine.get_stats().num_preemptions > 0
    assert_clean(engine)


def test_chunked_prefill_respects_budget():
    engine = make_engine(max_num_batched_tokens=8, max_model_len=128)
    prompt = list(range(3, 40))                      # 37 tokens -> 5 chunks of <= 8
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("short", [5, 6], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    out = run_all(engine)
    calls = engine.runner.model.calls
    assert max(calls) == 8 and len(calls) >= 5
    # Prompts computed once each (37 + 2), then 2 decodes per request.
    assert sum(calls) == 37 + 2 + 4
    assert out["long"].outputs[0].token_ids == reference_generate(prompt, 3, ignore_eos=True)


def test_prefix_cache_computes_only_the_suffix():
    engine = make_engine(num_kv_blocks=128, max_model_len=256)
    rng = random.Random(1)
    shared = [rng.randrange(3, VOCAB) for _ in range(200)]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", shared + [7, 8, 9], sp)
    a = run_all(engine)["a"]
    fed_after_a = engine.runner.model.tokens_fed
    engine.add_request("b", shared + [10, 11], sp)
    b = run_all(engine)["b"]
    fed_b = engine.runner.model.tokens_fed - fed_after_a
    # 200 shared tokens = 50 full blocks of 4, all cached; b computes its 2-token suffix
    # plus 3 decode steps.
    assert b.metrics.num_cached_tokens == 200
    assert fed_b == 2 + 3
    assert b.outputs[0].token_ids == reference_generate(shared + [10, 11], 4, ignore_eos=True)
    assert a.outputs[0].token_ids == reference_generate(shared + [7, 8, 9], 4, ignore_eos=True)
    assert engine.get_stats().prefix_cache_hit_rate > 0.45
    assert_clean(engine)


def test_prefix_cache_off_recomputes():
    engine = make_engine(num_kv_blocks=128, max_model_len=256, enable_prefix_caching=False)
    shared = list(range(3, 63)) * 2
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("a", shared, sp)
    run_all(engine)
    before = engine.runner.model.tokens_fed
    engine.add_request("b", shared + [5], sp)
    run_all(engine)
    assert engine.runner.model.tokens_fed - before == len(shared) + 1 + 1


def test_n_samples_share_prompt_blocks():
    engine = make_engine(num_kv_blocks=64, max_model_len=64, enable_prefix_caching=False)
    prompt = list(range(3, 13))                      # 2 full blocks + 2 tokens
    engine.add_request("n3", prompt, SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()                                    # prefill + fork
    seqs = engine.scheduler.groups["n3"].seqs
    assert len(seqs) == 3
    head = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == head for s in seqs)
    assert len({s.block_table[2] for s in seqs}) == 3   # private copies of the partial block
    for b in head:
        assert engine.block_manager.allocator.ref_count(b) == 3
    out = run_all(engine)["n3"]
    ref = reference_generate(prompt, 6, ignore_eos=True)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(o.token_ids == ref for o in out.outputs)
    assert engine.runner.model.tokens_fed == 10 + 3 * 5     # prompt once, then 3 decodes x 5
    assert_clean(engine)


def test_n_samples_random_differ_and_finish():
    engine = make_engine(num_kv_blocks=16, max_model_len=64)
    engine.add_request("r", list(range(3, 20)),
                       SamplingParams(n=4, temperature=5.0, seed=3, max_tokens=8, ignore_eos=True))
    out = run_all(engine)["r"]
    assert len(out.outputs) == 4
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_clean(engine)


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "mid_decode", "swapped"])
def test_abort_frees_everything(when):
    # 24 blocks of 4 tokens: the two requests outgrow the cache after ~22 decode steps,
    # and then the newer one (the victim) is swapped out.
    engine = make_engine(max_num_batched_tokens=8, num_kv_blocks=24, swap_space=0.001,
                         max_model_len=96)
    other_prompt = list(range(5, 45))
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("other", other_prompt, sp)
    engine.add_request("victim", list(range(3, 15)), sp)
    victim = engine.scheduler.groups["victim"].seqs[0]
    reached = {
        "waiting": lambda: victim.status is SequenceStatus.WAITING,
        "mid_prefill": lambda: 0 < victim.num_computed_tokens < victim.prompt_len,
        "mid_decode": lambda: victim.num_output_tokens >= 3,
        "swapped": lambda: victim.status is SequenceStatus.SWAPPED,
    }[when]
    for _ in range(200):
        if reached():
            break
        engine.step()
    assert reached()
    engine.abort_request("victim")
    assert victim.status is SequenceStatus.FINISHED_ABORTED
    assert victim.block_table == [] and victim.swapped_kv is None
    finished = run_all(engine)
    assert set(finished) == {"other"}
    assert finished["other"].outputs[0].token_ids == reference_generate(other_prompt, 40, ignore_eos=True)
    assert_clean(engine)


def test_impossible_requests_rejected_others_unharmed():
    engine = make_engine(num_kv_blocks=8, max_model_len=40)     # 8 blocks = 32 tokens
    engine.add_request("ok", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", list(range(3, 40)), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(3, 30)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="token id"):
        engine.add_request("bad", [1, VOCAB], SamplingParams())
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("ok", [1], SamplingParams())
    out = run_all(engine)
    assert set(out) == {"ok"}
    assert out["ok"].outputs[0].token_ids == reference_generate([5, 6, 7], 10, ignore_eos=True)
    assert_clean(engine)


def test_stop_token_ids_min_tokens_and_eos():
    engine = make_engine(max_model_len=128)
    prompts = random_prompts(30, random.Random(5))
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", p, SamplingParams(temperature=0, max_tokens=30,
                                                     stop_token_ids=[7, 11], min_tokens=3))
    finished = run_all(engine)
    reasons = set()
    for i, p in enumerate(prompts):
        o = finished[f"s{i}"].outputs[0]
        assert o.token_ids == reference_generate(p, 30, stop_token_ids=(7, 11), min_tokens=3)
        reasons.add(o.finish_reason)
        if o.finish_reason == "stop":
            assert o.stop_reason == (o.token_ids[-1] if o.token_ids[-1] != EOS else None)
    assert reasons == {"stop", "length"}
    assert_clean(engine)


def test_stress_500_random_requests_small_cache():
    rng = random.Random(7)
    engine = make_engine(num_kv_blocks=40, max_num_batched_tokens=32, max_num_seqs=16,
                         max_model_len=64, swap_space=0.0005)
    expected, finished = {}, {}
    for i in range(500):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))]
        sp = SamplingParams(n=rng.choice([1, 1, 1, 2]), temperature=rng.choice([0, 0.7, 1.5]),
                            top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([-1, 5]),
                            max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5,
                            seed=rng.choice([None, i]))
        engine.add_request(f"q{i}", prompt, sp)
        expected[f"q{i}"] = sp
        if rng.random() < 0.3:
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
    finished.update(run_all(engine))
    assert set(finished) == set(expected)
    for rid, sp in expected.items():
        outs = finished[rid].outputs
        assert len(outs) == sp.n
        for o in outs:
            if o.finish_reason == "length":
                assert len(o.token_ids) == sp.max_tokens
            else:
                assert o.finish_reason == "stop" and o.token_ids[-1] == EOS and not sp.ignore_eos
                assert len(o.token_ids) <= sp.max_tokens
    assert engine.get_stats().num_preemptions > 0
    assert_clean(engine)


# -- review fixes: over-long prompts, failed steps, block moves, streaming, outputs ------------

def test_prompt_without_room_is_rejected_with_max_tokens_none():
    """max_tokens=None means "up to max_model_len": a prompt that already fills it must be
    refused at add time, not crash the engine later."""
    engine = make_engine(max_model_len=32)
    engine.add_request("ok", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for n in (32, 40):
        with pytest.raises(ValueError, match="max_model_len"):
            engine.add_request(f"long{n}", [5] * n, SamplingParams(max_tokens=None))
    prompt = list(range(3, 34))                    # 31 tokens: room for exactly one more
    engine.add_request("fits", prompt, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert engine.scheduler.max_new_tokens(engine.scheduler.groups["fits"]) == 1
    out = run_all(engine)
    assert set(out) == {"ok", "fits"}
    assert out["ok"].outputs[0].token_ids == reference_generate([5, 6, 7], 10, ignore_eos=True)
    assert out["fits"].outputs[0].token_ids == reference_generate(prompt, 1, ignore_eos=True)
    assert out["fits"].outputs[0].finish_reason == "length"
    assert_clean(engine)


class FailingModel(FakeModel):
    def __init__(self):
        super().__init__()
        self.fail = False

    def __call__(self, *args):
        if self.fail:
            raise RuntimeError("device fell over")
        return super().__call__(*args)


def test_failed_step_frees_its_requests_and_the_engine_goes_on():
    model = FailingModel()
    engine = make_engine(model=model, max_model_len=64)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", list(range(3, 12)), sp)
    engine.add_request("b", [5, 6], sp)
    engine.step()
    model.fail = True
    with pytest.raises(RuntimeError, match="fell over"):
        engine.step()
    assert_clean(engine)                           # no blocks held, nothing queued
    model.fail = False
    engine.add_request("c", [7, 8, 9], sp)
    out = run_all(engine)
    assert set(out) == {"c"}
    assert out["c"].outputs[0].token_ids == reference_generate([7, 8, 9], 8, ignore_eos=True)
    assert_clean(engine)


def test_scheduler_only_describes_block_moves():
    """The scheduler never calls the runner: swap-outs, swap-ins and fork copies travel in
    SchedulerOutput, and the runner applies them (outputs still match the reference)."""
    import inspect
    from fastllm.engine import scheduler as scheduler_module
    params = inspect.signature(scheduler_module.Scheduler).parameters
    assert "runner" not in params and "cache_ops" not in params
    assert "self.cache_ops" not in inspect.getsource(scheduler_module)

    engine = make_engine(max_num_batched_tokens=8, num_kv_blocks=24, swap_space=0.001,
                         max_model_len=96, enable_prefix_caching=False)
    outputs = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: outputs.append(schedule()) or outputs[-1]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = {"old": list(range(5, 45)), "new": list(range(3, 15))}
    for rid, p in prompts.items():
        engine.add_request(rid, p, sp)
    engine.add_request("fork", [4, 5, 6], SamplingParams(n=2, temperature=0, max_tokens=3,
                                                         ignore_eos=True))
    out = run_all(engine)
    for rid, p in prompts.items():
        assert out[rid].outputs[0].token_ids == reference_generate(p, 40, ignore_eos=True)
    swapped_out = [pair for o in outputs for pair in o.blocks_to_swap_out]
    swapped_in = [pair for o in outputs for pair in o.blocks_to_swap_in]
    assert swapped_out and sorted(c for _, c in swapped_out) == sorted(c for c, _ in swapped_in)
    # The fork's partial last block (3 tokens of a 4-token block) is copied once.
    assert sum(len(o.blocks_to_copy) for o in outputs) == 1
    assert_clean(engine)


def test_failed_block_moves_abort_a_forked_child_that_was_not_scheduled(monkeypatch):
    """The fork copy of a child's last block fails with the step; the child is not in the
    step (say the budget ran out before it) but must not run on with a garbage block."""
    engine = make_engine(max_model_len=64, enable_prefix_caching=False)
    engine.add_request("fork", [4, 5, 6], SamplingParams(n=2, temperature=0, max_tokens=6,
                                                         ignore_eos=True))
    engine.add_request("other", [7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()                                    # prefill: "fork" forks, a copy is pending
    schedule = engine.scheduler.schedule

    def without_the_fork():
        out = schedule()
        out.scheduled = [s for s in out.scheduled if s.request_id != "fork"]
        return out
    monkeypatch.setattr(engine.scheduler, "schedule", without_the_fork)
    apply = engine.runner.kv.apply_cache_ops

    def failing(out):
        if out.blocks_to_copy:
            raise RuntimeError("copy failed")
        apply(out)
    monkeypatch.setattr(engine.runner.kv, "apply_cache_ops", failing)
    with pytest.raises(RuntimeError, match="copy failed"):
        engine.step()
    assert_clean(engine)


def test_a_failed_update_aborts_and_frees_everything(monkeypatch):
    engine = make_engine(max_model_len=64)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", list(range(3, 12)), sp)
    engine.add_request("b", [5, 6], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    check_stop = engine.scheduler._check_stop
    calls = []

    def failing(seq):
        calls.append(seq)
        if len(calls) == 2:                          # halfway through the step's update
            raise RuntimeError("stop check fell over")
        return check_stop(seq)
    monkeypatch.setattr(engine.scheduler, "_check_stop", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        engine.step()
    assert_clean(engine)
    monkeypatch.setattr(engine.scheduler, "_check_stop", check_stop)
    engine.add_request("c", [7, 8, 9], sp)
    out = run_all(engine)
    assert out["c"].outputs[0].token_ids == reference_generate([7, 8, 9], 8, ignore_eos=True)
    assert_clean(engine)


def test_swap_in_without_blocks_is_an_error_not_a_silent_overrun(monkeypatch):
    """A swap-in that cannot get its slots (impossible after the exact free-block check,
    forced here) raises, and leaves the scheduler as it was: the sequence back in swap
    space with its KV, no GPU block leaked, nothing half scheduled. The engine then
    finishes every request with the right tokens."""
    engine = make_engine(num_kv_blocks=12, swap_space=0.001, max_model_len=48)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[3 + i] * 10 for i in range(3)]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, sp)
    sch, bm = engine.scheduler, engine.block_manager
    allocate = bm.allocate_slots
    monkeypatch.setattr(bm, "allocate_slots", lambda seq, n: (
        False if seq.status is SequenceStatus.SWAPPED else allocate(seq, n)))
    before = []                      # the scheduler's state as each schedule() began
    schedule = sch.schedule

    def snapshot():
        return dict(swapped=[(seq, list(seq.swapped_kv), seq.status) for seq in sch.swapped],
                    running=[(seq, list(seq.block_table)) for seq in sch.running],
                    free_swap=sorted(bm._free_swap_blocks), num_free=bm.num_free_blocks,
                    pending_copies=list(bm._pending_copies))

    def recording_schedule():
        before.append(snapshot())
        return schedule()
    monkeypatch.setattr(sch, "schedule", recording_schedule)
    finished = {}

    def drive():
        while engine.has_unfinished_requests():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
    with pytest.raises(RuntimeError, match="swapped-in"):
        drive()
    assert sch.num_swaps_out > 0
    # The failed schedule() had popped the sequence and allocated its blocks: undone.
    state = snapshot()
    assert state["swapped"] and all(seq.block_table == [] for seq, _, _ in state["swapped"])
    assert state == before[-1]

    monkeypatch.undo()
    drive()
    for i, prompt in enumerate(prompts):
        assert finished[str(i)].outputs[0].token_ids == reference_generate(prompt, 20, ignore_eos=True)
    assert engine.block_manager.num_swap_blocks_used == 0
    assert_clean(engine)


def test_close_with_swapped_running_and_waiting_requests_loses_nothing():
    """close() releases the swap space: the swapped-out request goes back to be
    recomputed, the engine swaps no more, and every request -- swapped, running, waiting --
    still finishes with the reference tokens, leaving no block in use."""
    engine = make_engine(max_num_batched_tokens=8, num_kv_blocks=24, swap_space=0.001,
                         max_model_len=96, max_num_seqs=2)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = {"old": list(range(5, 45)), "victim": list(range(3, 15)), "queued": [7, 8, 9]}
    for rid, p in prompts.items():
        engine.add_request(rid, p, sp)
    sch = engine.scheduler
    victim = sch.groups["victim"].seqs[0]
    finished = {}
    for _ in range(200):
        if victim.status is SequenceStatus.SWAPPED:
            break
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert victim.status is SequenceStatus.SWAPPED and sch.running and sch.waiting
    assert engine.block_manager.num_swap_blocks_used > 0
    engine.close()
    assert not sch.swapped and victim.status is SequenceStatus.WAITING
    assert victim.num_computed_tokens == 0 and victim.swapped_kv is None
    assert engine.block_manager.num_swap_blocks == engine.block_manager.num_swap_blocks_used == 0
    swaps = sch.num_swaps_out
    finished.update(run_all(engine))
    assert sch.num_swaps_out == swaps                # no swap-out (or swap-in) after close
    for rid, p in prompts.items():
        assert finished[rid].outputs[0].token_ids == reference_generate(p, 40, ignore_eos=True)
        assert finished[rid].outputs[0].finish_reason == "length"
    engine.close()                                   # idempotent
    assert_clean(engine)


def test_rollback_refeeds_the_forgotten_tokens_and_changes_nothing_else():
    """Scheduler.rollback(seq, k): the KV of the last k computed tokens is forgotten and
    fed again the next step (one chunk of k + 1 tokens), outputs unchanged. Tokens in
    shared or prefix-cached blocks cannot be rolled back."""
    engine = make_engine(max_model_len=64, enable_prefix_caching=False)
    prompt = list(range(3, 13))
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(4):
        engine.step()                                # prefill + 3 decodes
    seq = engine.scheduler.groups["a"].seqs[0]
    assert seq.num_computed_tokens == seq.num_tokens - 1 == 13
    blocks = list(seq.block_table)
    with pytest.raises(ValueError, match="rollback num_tokens"):
        engine.scheduler.rollback(seq, 14)
    engine.scheduler.rollback(seq, 5)
    assert seq.num_computed_tokens == 8 and seq.block_table == blocks
    calls = engine.runner.model.calls
    n = len(calls)
    out = run_all(engine)
    assert calls[n] == 6                             # the 5 forgotten tokens + the last one
    assert out["a"].outputs[0].token_ids == reference_generate(prompt, 12, ignore_eos=True)
    assert_clean(engine)

    cached = make_engine(max_model_len=64)           # prefix caching on
    cached.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    cached.step()
    seq = cached.scheduler.groups["b"].seqs[0]       # 10 computed: blocks 0, 1 registered
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cached.scheduler.rollback(seq, 3)
    cached.scheduler.rollback(seq, 2)                # positions 8, 9: block 2, its own
    assert seq.num_computed_tokens == 8
    out = run_all(cached)
    assert out["b"].outputs[0].token_ids == reference_generate(prompt, 12, ignore_eos=True)
    assert_clean(cached)


def _one_step_result(out, tokens_per_seq):
    from fastllm.engine.step_data import RunnerOutput, SampledToken
    return RunnerOutput(seq_ids=[s.seq_id for s in out.scheduled],
                        sampled=[[SampledToken(t, None, None) for t in tokens_per_seq(s)] for s in out.scheduled])


def test_update_advances_a_sequence_by_k_tokens_up_to_the_first_stop():
    """A RunnerOutput may carry k > 1 tokens for a sequence (speculative decoding's
    accepted tokens): update() appends them in order, checks stops after each, and drops
    what follows a stop token or the length limit."""
    engine = make_engine(max_model_len=64)
    sch = engine.scheduler
    engine.add_request("k", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10,
                                                      stop_token_ids=[33]))
    engine.add_request("len", [8, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = sch.schedule()
    scripted = {"k": [20, 21, 22], "len": [40, 41, 42]}
    grown = sch.update(out, _one_step_result(out, lambda s: scripted[s.request_id]))
    k, length = sch.groups["k"].seqs[0], sch.groups["len"].seqs[0]
    assert grown == [k, length]
    assert k.output_token_ids == [20, 21, 22] and k.num_computed_tokens == 3
    assert length.output_token_ids == [40, 41, 42]
    out = sch.schedule()                             # k feeds its 3 new tokens
    assert [s.token_ids for s in out.scheduled] == [[20, 21, 22], [40, 41, 42]]
    scripted = {"k": [23, 33, 24], "len": [43, 44]}
    sch.update(out, _one_step_result(out, lambda s: scripted[s.request_id]))
    assert k.output_token_ids == [20, 21, 22, 23, 33] and k.status is SequenceStatus.FINISHED_STOPPED
    assert k.stop_reason == 33 and k.block_table == []
    assert length.output_token_ids == [40, 41, 42, 43] and length.status is SequenceStatus.FINISHED_LENGTH
    assert not sch.running and engine.block_manager.num_used_blocks == 0


def test_update_refuses_a_runner_output_for_other_sequences():
    engine = make_engine(max_model_len=64)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    out = engine.scheduler.schedule()
    from fastllm.engine.step_data import RunnerOutput
    with pytest.raises(ValueError, match="seq_ids"):
        engine.scheduler.update(out, RunnerOutput(seq_ids=[-5], sampled=[[]]))
