"""A step's attention is planned once (AttentionMetadata) and every layer runs on that plan."""
import pytest
import torch

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams, ops
from fastllm.engine.cuda_graphs import DecodeGraphRunner, EagerCapturer
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.loader import load_model

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")


def spy(monkeypatch):
    """Records every plan made and the plan each paged_attention call ran on."""
    plans, calls = [], []
    real_plan, real_attention = ops.plan_attention, ops.paged_attention

    def plan_attention(**kw):
        plans.append(real_plan(**kw))
        return plans[-1]

    def paged_attention(*args, plan=None, **kw):
        calls.append(plan)
        real_attention(*args, plan=plan, **kw)
    monkeypatch.setattr(ops, "plan_attention", plan_attention)
    monkeypatch.setattr(ops, "paged_attention", paged_attention)
    return plans, calls


def prompt_step(spec=None):
    """input_ids, positions, metadata: one 5-token prompt in blocks 0, 1 of size 4."""
    meta = AttentionMetadata(torch.arange(5), torch.tensor([[0, 1]], dtype=torch.int32),
                             torch.tensor([5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32),
                             max_query_len=5, spec=spec)
    return torch.tensor([5, 6, 7, 8, 9]), torch.arange(5), meta


def test_model_plans_once_and_every_layer_runs_on_that_plan(monkeypatch):
    model, config = load_model(cached_checkpoint("llama", num_hidden_layers=3))
    kv = allocate_kv_caches(config, 8, 4)
    plans, calls = spy(monkeypatch)
    ids, pos, meta = prompt_step()
    logits = model(ids, pos, kv, meta)
    assert len(plans) == 1 and len(calls) == 3 and all(c is plans[0] for c in calls)
    assert meta.plan is None  # metadata built without a spec is planned on a copy
    # Planned when built, as the model runner builds it: the model plans nothing more.
    ids, pos, planned = prompt_step(spec=model.attention_spec(kv))
    assert len(plans) == 2 and planned.plan is plans[1]
    again = model(ids, pos, kv, planned)
    assert len(plans) == 2 and len(calls) == 6 and all(c is planned.plan for c in calls[3:])
    assert torch.equal(again, logits)


def test_metadata_planned_for_other_layers_is_refused():
    model, config = load_model(cached_checkpoint("llama"))
    kv = allocate_kv_caches(config, 8, 4)
    ids, pos, meta = prompt_step(spec=model.attention_spec(kv)._replace(block_size=8))
    with pytest.raises(ValueError, match="plan: made for .* block_size=8"):  # the kernel's check of the call
        model(ids, pos, kv, meta)
    with pytest.raises(ValueError, match="planned for"):
        meta.planned_for(model.attention_spec(kv))


def test_every_engine_step_is_planned_once(monkeypatch):
    # The layer-by-layer path's paged_attention calls are counted: the C++ CPU decoder
    # (model/cpu_decoder.py) calls the CPU kernel itself, which needs no plan.
    monkeypatch.setenv("FASTLLM_CPU_DECODER", "0")
    path = cached_checkpoint("llama")
    llm = LLM(str(path), device="cpu", max_model_len=128, num_kv_blocks=64)
    plans, calls = spy(monkeypatch)
    outs = llm.generate([[5, 6, 7], [8, 9, 10, 11, 12]], SamplingParams(max_tokens=4, temperature=0))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    num_layers = 2
    assert plans and len(calls) == num_layers * len(plans)
    assert all(sum(c is p for c in calls) == num_layers for p in plans)


def test_each_captured_decode_plans_for_its_static_buffers(monkeypatch):
    # A captured graph replays what its capture planned: the bucket's rows and the static
    # table width, one query per row (the decode kernel alone).
    model, config = load_model(cached_checkpoint("llama"))
    kv = allocate_kv_caches(config, 16, 4)
    runner = DecodeGraphRunner(model, kv, batch_sizes=[1, 2, 4], max_blocks_per_seq=6,
                               vocab_size=config.vocab_size, device="cpu", capturer=EagerCapturer())
    plans, _ = spy(monkeypatch)
    runner.capture()
    assert sorted(p.kernels.num_tokens for p in plans) == [1, 2, 4]
    assert all(p.kernels.num_seqs == p.kernels.num_tokens and p.kernels.max_blocks_per_seq == 6
               and p.max_query_len == 1 and not p.kernels.prefill_kernel for p in plans)
