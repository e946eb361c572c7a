"""InputBatch: the step's index tensors and sampling batch, packed from the
SchedulerOutput's plain data into one upload each, built before the forward pass."""
import numpy as np
import pytest
import torch

from fake_engine import (VOCAB, FakeModel, assert_clean, make_engine, reference_generate,
                         run_all)
from fastllm.sampling_params import SamplingParams


def test_runner_stages_the_batch_in_one_buffer():
    """prepare() writes every index tensor into one host buffer copied at once: the
    int64 tensors are views of the same storage."""
    engine = make_engine(max_model_len=64)
    engine.add_request("a", list(range(3, 12)), SamplingParams(max_tokens=3))
    engine.add_request("b", [5, 6], SamplingParams(max_tokens=3))
    engine.step()
    sched = engine.scheduler.schedule()
    input_ids, positions, meta = engine.runner.inputs.prepare(sched.scheduled)
    storage = input_ids.untyped_storage().data_ptr()
    assert positions.untyped_storage().data_ptr() == storage
    assert meta.slot_mapping.untyped_storage().data_ptr() == storage
    seqs = [engine.scheduler.groups[rid].seqs[0] for rid in ("a", "b")]
    assert [s.seq_id for s in sched.scheduled] == [s.seq_id for s in seqs]
    assert input_ids.tolist() == [s.token_ids[-1] for s in seqs]
    assert positions.tolist() == [s.num_tokens - 1 for s in seqs]
    bs = engine.block_manager.block_size
    assert bs == 4
    assert meta.slot_mapping.tolist() == [s.block_table[(s.num_tokens - 1) // bs] * bs
                                          + (s.num_tokens - 1) % bs for s in seqs]
    assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.tolist() == [s.num_tokens for s in seqs]
    assert meta.query_start_loc.tolist() == [0, 1, 2]
    assert meta.block_tables.dtype == torch.int32
    assert meta.block_tables[0, :len(seqs[0].block_table)].tolist() == seqs[0].block_table


def test_penalty_inputs_only_for_penalized_rows_and_the_prompt_goes_up_once(monkeypatch):
    """Token lists only for penalized rows; a repetition-penalty prompt is uploaded the
    first time it is needed and then passed as the runner's cached device tensor."""
    from fastllm.engine import input_batch
    calls = []
    original = input_batch.SamplingBatch.stage

    def spy(params, gens, prompts, outputs, *args, **kwargs):
        staged = original(params, gens, prompts, outputs, *args, **kwargs)
        calls.append((list(params), list(prompts), list(outputs), dict(staged.arrays)))
        return staged
    monkeypatch.setattr(input_batch.SamplingBatch, "stage", staticmethod(spy))
    engine = make_engine(max_model_len=64)
    engine.add_request("plain", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("pen", [8, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                     repetition_penalty=1.5))
    engine.step()
    state = engine.runner.requests["pen"]          # the runner's, keyed by request id
    run_all(engine)
    assert len(calls) == 4
    uploaded_prompt_ids = []
    for step, (params, prompts, outputs, arrays) in enumerate(calls):
        uploaded_prompt_ids += arrays.get("new_prompt_ids", np.empty(0, np.int64)).tolist()
        for p, prompt, output in zip(params, prompts, outputs):
            if p.repetition_penalty == 1.0:
                assert prompt is None and output is None
            else:
                assert output is not None
                if step == 0:
                    assert prompt == [8, 9]
                else:
                    assert prompt is state.device_prompt             # made once, reused
                    assert prompt.tolist() == [8, 9]
    assert uploaded_prompt_ids == [8, 9]


def test_sampling_batch_is_built_before_the_forward_in_one_upload(monkeypatch):
    """The step's sampling batch depends only on the schedule: it is built (and uploaded
    as views of one buffer) before the model runs, so its host work overlaps the forward."""
    from fastllm.engine import input_batch
    events = []
    original = input_batch.SamplingBatch.stage
    monkeypatch.setattr(input_batch.SamplingBatch, "stage", staticmethod(
        lambda *a, **k: events.append("batch") or original(*a, **k)))

    class RecordingModel(FakeModel):
        def __call__(self, *args):
            events.append("forward")
            return super().__call__(*args)
    engine = make_engine(model=RecordingModel(), max_model_len=64, max_num_batched_tokens=8)
    batches = []
    sampler = engine.runner.sampler
    engine.runner.sampler = lambda logits, batch: batches.append(batch) or sampler(logits, batch)
    prompt = list(range(3, 15))                        # 12 tokens: a mid-prefill chunk first
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.01, seed=1, max_tokens=3,
                        ignore_eos=True, presence_penalty=0.5, repetition_penalty=1.2, min_tokens=2)
    engine.add_request("a", prompt, sp)
    run_all(engine)
    # Step 1 is mid-prefill (nothing sampled); every later step builds before it forwards.
    assert events == ["forward", "batch", "forward", "batch", "forward", "batch", "forward"]
    for batch in batches:
        tensors = [batch.is_greedy, batch.temperature, batch.top_k, batch.top_p, batch.min_p,
                   batch.presence_penalty, *batch.output_tokens]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1


def test_a_step_samples_at_most_max_num_seqs_rows_at_once():
    """n > 1 prompts completing together sample n rows each: the runner splits them into
    chunks of max_num_seqs rows (what the sampler's memory was profiled for)."""
    engine = make_engine(max_model_len=64, max_num_seqs=3)
    shapes = []
    sampler = engine.runner.sampler
    engine.runner.sampler = lambda logits, batch: shapes.append(tuple(logits.shape)) or sampler(logits, batch)
    prompts = {"x": [4, 5, 6], "y": [7, 8, 9, 10]}
    for rid, p in prompts.items():
        engine.add_request(rid, p, SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True))
    out = run_all(engine)
    assert shapes[0] == (3, VOCAB) and shapes[1] == (1, VOCAB)    # 4 rows in the first step
    assert max(s[0] for s in shapes) <= 3
    for rid, p in prompts.items():
        ref = reference_generate(p, 3, ignore_eos=True)
        assert [c.token_ids for c in out[rid].outputs] == [ref, ref]
    assert_clean(engine)


def test_a_too_short_block_table_raises_instead_of_writing_block_0():
    engine = make_engine(max_model_len=64)
    engine.add_request("long", list(range(3, 15)), SamplingParams(max_tokens=2))    # 3 blocks
    engine.add_request("short", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=2))  # 2 blocks
    sched = engine.scheduler.schedule()
    short = sched.scheduled[1]
    assert short.request_id == "short" and len(short.block_table) == 2
    short.block_table = short.block_table[:1]        # a bug: positions 4, 5 have no block
    with pytest.raises(RuntimeError, match="block_table has 1 blocks"):
        engine.runner.inputs.prepare(sched.scheduled)
