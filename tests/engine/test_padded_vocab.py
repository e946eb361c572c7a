"""A model whose embedding has more rows than its tokenizer has tokens (Qwen2.5:
151936 rows, 151665 tokens). The padded rows here carry the largest logits, so an
engine that sampled them would do so at once."""
import pytest
import torch

from checkpoints import EOS_ID, load_hf_model, run_all, write_checkpoint, write_tokenizer
from fastllm.config import EngineConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams

TOKENS, ROWS = 384, 448        # tokenizer size, embedding rows


@pytest.fixture(scope="module")
def padded_path(tmp_path_factory):
    from safetensors.torch import load_file, save_file
    path = write_checkpoint(tmp_path_factory.mktemp("padded"), "qwen2", tokenizer=False,
                            vocab_size=ROWS)
    write_tokenizer(path, TOKENS)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    embed = tensors["model.embed_tokens.weight"]       # tied: also the LM head
    embed[TOKENS:] = embed[TOKENS:] * 6.0 + 0.5
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def make_engine(path, **kw):
    return LLMEngine.from_pretrained(str(path), EngineConfig(max_model_len=128, num_kv_blocks=64, **kw),
                                     dtype="float32", device="cpu")


def test_padded_rows_dominate_the_raw_logits(padded_path):
    # The premise: unmasked, the model would pick padded ids.
    hf = load_hf_model(padded_path)
    with torch.no_grad():
        logits = hf(torch.tensor([[5, 17, 99, 3]])).logits[0, -1]
    assert int(logits.argmax()) >= TOKENS


def test_hot_sampling_never_emits_a_padded_id(padded_path):
    engine = make_engine(padded_path)
    assert len(engine.tokenizer) == TOKENS and engine.model_config.vocab_size == ROWS
    for i in range(12):
        engine.add_request(f"hot{i}", [5 + i, 17, 99, 3], SamplingParams(
            temperature=5.0, max_tokens=40, ignore_eos=True, seed=i, logprobs=2, n=2 if i % 3 == 0 else 1))
    outs = run_all(engine)
    assert len(outs) == 12
    for out in outs.values():
        for completion in out.outputs:
            assert completion.finish_reason == "length" and len(completion.token_ids) == 40
            assert max(completion.token_ids) < TOKENS
            assert all(max(step) < TOKENS for step in completion.logprobs)
            assert completion.text == engine.tokenizer.decode(completion.token_ids)


def test_greedy_matches_transformers_with_padded_ids_suppressed(padded_path):
    hf = load_hf_model(padded_path)
    prompt = [5, 17, 99, 3, 250, 41]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          suppress_tokens=list(range(TOKENS, ROWS)), eos_token_id=EOS_ID,
                          pad_token_id=0)[0, len(prompt):].tolist()
    engine = make_engine(padded_path)
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=12))
    got = run_all(engine)["g"].outputs[0].token_ids
    assert got == (ref[:ref.index(EOS_ID) + 1] if EOS_ID in ref else ref)


def test_ids_in_the_gap_are_refused_for_that_request_only(padded_path):
    engine = make_engine(padded_path)
    engine.add_request("ok", [5, 17], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ValueError, match=rf"prompt token id {TOKENS + 3}"):
        engine.add_request("gap", [5, TOKENS + 3], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("stop", [5], SamplingParams(max_tokens=4, stop_token_ids=[TOKENS]))
    outs = run_all(engine)
    assert list(outs) == ["ok"] and len(outs["ok"].outputs[0].token_ids) == 4
    assert engine.block_manager.num_used_blocks == 0
