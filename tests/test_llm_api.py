"""The user-facing `LLM` API on a tiny random-weight checkpoint, checked against HF."""
import pytest
import torch

from checkpoints import cached_checkpoint, hf_greedy, load_hf_model
from fastllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def path():
    return cached_checkpoint("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(str(path), device="cpu", max_model_len=128, num_kv_blocks=64)


@pytest.fixture(scope="module")
def hf(path):
    return load_hf_model(path)



def test_generate_mixed_prompts_in_order(llm, hf):
    tok = llm.get_tokenizer()
    prompts = ["The capital of France is", [5, 17, 99, 3], "Hello world!", [200] * 30]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert len(outs) == 4
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        assert out.prompt_token_ids == ids
        assert out.prompt == (prompt if isinstance(prompt, str) else None)
        completion = out.outputs[0]
        assert completion.token_ids == hf_greedy(hf, ids, 12)
        assert completion.text == tok.decode(completion.token_ids)
        assert out.finished and completion.finish_reason in ("stop", "length")
        assert out.metrics.first_token_time >= out.metrics.arrival_time


def test_single_prompt_forms(llm):
    one = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    ids = llm.get_tokenizer().encode("Hello")
    same = llm.generate(ids, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(one) == len(same) == 1
    assert one[0].outputs[0].token_ids == same[0].outputs[0].token_ids


def test_per_prompt_sampling_params(llm):
    outs = llm.generate([[5, 6], [7, 8]], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                           SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="sampling_params has 1 entries"):
        llm.generate([[5], [6]], [SamplingParams()], use_tqdm=False)


def test_bad_inputs_raise_and_leave_engine_clean(llm):
    with pytest.raises(ValueError, match="prompts"):
        llm.generate([1.5], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5, 6], [5] * 200], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.block_manager.num_used_blocks == 0
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("unused", tensor_parallel_size=0)


def test_chat_equals_generate_on_template(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    sp = SamplingParams(temperature=0, max_tokens=6)
    chat = llm.chat(messages, sp, use_tqdm=False)
    ids = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    plain = llm.generate([ids], sp, use_tqdm=False)
    assert chat[0].prompt_token_ids == ids
    assert chat[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "Bye"}]], sp, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_seeded_sampling_is_batch_independent(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[9, 10, 11]], sp, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate([[40] * 20, [9, 10, 11], [7] * 5],
                         [SamplingParams(temperature=0.7, max_tokens=10), sp,
                          SamplingParams(temperature=0, max_tokens=4)], use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone


def test_n_samples(llm):
    out = llm.generate([[9, 10, 11]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_logprobs_match_transformers(llm, hf):
    prompt = [5, 17, 99, 3, 42]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=2,
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(full).logits[0].double(), dim=-1)
    cumulative = 0.0
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok in entry and entry[tok].rank == 1
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert len(entry) <= 3
        cumulative += float(row[tok])
    assert out.cumulative_logprob == pytest.approx(cumulative, abs=1e-3)


def test_stats_after_generate(llm):
    llm.generate([[3] * 40 + [4], [3] * 40 + [5]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.generate([[3] * 40 + [6]], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0
    assert stats.prefix_cache_hit_rate > 0
    assert stats.requests and all(r.ttft is not None and r.ttft >= 0 for r in stats.requests)
    assert "prefix cache hit rate" in stats.format()


def test_generate_builds_only_final_outputs(llm, monkeypatch):
    """LLM.generate keeps only finished outputs, so the engine must not build one per
    request per step (FINAL_ONLY); the caller's SamplingParams are left as they were."""
    from fastllm.sampling_params import RequestOutputKind
    engine = llm.llm_engine
    built = []
    make_output = engine.output_processor.make_output
    monkeypatch.setattr(engine.output_processor, "make_output",
                        lambda g: built.append(g.request_id) or make_output(g))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [8, 9], [10]], sp, use_tqdm=False)
    assert len(built) == 3 and [len(o.outputs[0].token_ids) for o in outs] == [6, 6, 6]
    assert sp.output_kind is RequestOutputKind.CUMULATIVE


@pytest.mark.cuda
def test_gpu_penalties_and_default_device_match_cpu(path):
    # device="cuda" without an index, and repetition penalties (the prompt tensor is cached
    # on the device across steps): same greedy tokens as on the CPU, in float32.
    params = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3, presence_penalty=0.5)
    prompts = [[5, 9, 11, 5, 9], [7, 3, 3, 3]]
    cpu = LLM(str(path), device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=64)
    gpu = LLM(str(path), device="cuda", dtype="float32", max_model_len=128, num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in gpu.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_malformed_chat_and_params_name_the_field(llm):
    sp = SamplingParams(temperature=0, max_tokens=2)
    for messages, match in (([5], r"messages\[0\] must be a dict"),
                            ([[{"role": "user", "content": "a"}], 5], r"messages must be a list"),
                            ([{"role": None, "content": "a"}], r"messages\[0\]\.role")):
        with pytest.raises(ValueError, match=match):
            llm.chat(messages, sp, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate(["x"], {"max_tokens": 2}, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
