"""The grammar state behind a request: masks from xgrammar over fastllm's tokenizer (a
Hugging Face tokenizer.json and a GGUF's vocabulary), fork and rollback, the padded vocab."""
from __future__ import annotations

import re

import numpy as np
import pytest

from checkpoints import cached_checkpoint, write_gguf
from fastllm import LLM, SamplingParams, StructuredOutputsParams
from fastllm.structured import StructuredOutputManager
from fastllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(cached_checkpoint("llama"))


def _grammar(manager, structured):
    request = manager.submit(structured)
    request.future.result(timeout=60)
    return manager.grammar_for(request)


def _allowed(bitmask_row: np.ndarray, vocab: int) -> set[int]:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")
    return {t for t in range(vocab) if bits[t]}


def test_mask_allows_exactly_the_tokens_that_continue_the_grammar(tokenizer):
    vocab = 400                                   # the model pads past the tokenizer's 384
    manager = StructuredOutputManager(tokenizer, vocab)
    grammar = _grammar(manager, StructuredOutputsParams(choice=["cat", "car", "dog"]))
    allowed = _allowed(manager.fill_bitmask([grammar])[0], vocab)
    # Independent check: a token is allowed iff its text starts some choice.
    texts = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    expected = {t for t, s in texts.items() if s and any(c.startswith(s) for c in ("cat", "car", "dog"))}
    assert allowed == expected
    assert not allowed & set(range(384, vocab))


def test_fork_and_rollback(tokenizer):
    manager = StructuredOutputManager(tokenizer, 384)
    grammar = _grammar(manager, StructuredOutputsParams(regex=r"ab(c|d)e"))
    start = manager.fill_bitmask([grammar])
    ids = tokenizer.encode("ab", add_special_tokens=False)
    assert grammar.accept_tokens(ids)
    after_ab = manager.fill_bitmask([grammar])
    child = grammar.fork()
    assert child.accept_tokens(tokenizer.encode("c", add_special_tokens=False))
    np.testing.assert_array_equal(manager.fill_bitmask([grammar]), after_ab)   # parent untouched
    assert not grammar.accept_token(tokenizer.encode("e", add_special_tokens=False)[0])  # refused: unchanged
    np.testing.assert_array_equal(manager.fill_bitmask([grammar]), after_ab)
    grammar.rollback(len(ids))
    np.testing.assert_array_equal(manager.fill_bitmask([grammar]), start)
    assert grammar.num_processed_tokens == 0
    with pytest.raises(ValueError, match="rollback"):
        grammar.rollback(1)


def _gguf_vocab_metadata(hf_dir) -> dict:
    """The checkpoint's byte-level BPE tokenizer as llama.cpp's GGUF keys (gpt2 model)."""
    import json
    model = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**model["model"]["vocab"], **{t["content"]: t["id"] for t in model["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
    specials = {t["content"] for t in model["added_tokens"]}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens]}


def test_gguf_vocabulary_drives_the_grammar(tmp_path):
    hf_dir = cached_checkpoint("llama")
    gguf = write_gguf(hf_dir, tmp_path / "tiny.gguf", metadata=_gguf_vocab_metadata(hf_dir))
    llm = LLM(str(gguf), device="cpu", max_model_len=256, num_kv_blocks=64)
    regex = r"[0-9]{2}:[a-z]{3}"
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=30, structured_outputs=StructuredOutputsParams(regex=regex))
              for s in range(3)]
    for out in llm.generate(["Hello"] * 3, params, use_tqdm=False):
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(regex, out.outputs[0].text)


def test_batched_fill_equals_row_by_row(tokenizer):
    manager = StructuredOutputManager(tokenizer, 384)
    grammars = [_grammar(manager, StructuredOutputsParams(regex=r"ab(c|d)e")),
                _grammar(manager, StructuredOutputsParams(choice=["cat", "dog"])),
                _grammar(manager, StructuredOutputsParams(json_object=True))]
    grammars[0].accept_tokens(tokenizer.encode("ab", add_special_tokens=False))
    batched = manager.fill_bitmask(grammars)
    rows = np.concatenate([manager.fill_bitmask([g]) for g in grammars])
    np.testing.assert_array_equal(batched, rows)
    assert len({r.tobytes() for r in batched}) == 3
