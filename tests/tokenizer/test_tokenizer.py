"""Tokenizer, chat template and streaming detokenizer, against transformers on the same
files: a Hugging Face directory and GGUF files (byte-level and sentencepiece) that the
tests write themselves from small tokenizers trained here. The real SmolLM2 GGUF is
covered in test_default_model.py."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, \
    processors, trainers  # noqa: E402

from fastllm.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string  # noqa: E402
from fastllm.tokenizer import Tokenizer  # noqa: E402

CORPUS = ["Hello world, this is a small corpus for training.",
          "The quick brown fox jumps over the lazy dog.",
          "Café au lait, naïve résumé; it's what they've said.",
          "Numbers 12345 and more words here, hello again world!"] * 20

TEXTS = ["Hello world", " two  spaces\n\nand lines", "héllo 👋 世界 😀!", "",
         "The lazy <tool> fox</s> ends", "it's 2024, isn't it?"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Héllo 👋, what is 世界?"},
            {"role": "assistant", "content": "The world."},
            {"role": "user", "content": "Thanks"}]


# -- fixtures: files written by the tests -------------------------------------------
def _train(model, pre_tokenizer, special_tokens, vocab_size=400, alphabet=()):
    tok = RawTokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=list(alphabet), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _write_gguf(path, model, tokens, types, scores=None, merges=None, pre="default",
                add_bos=None, chat_template=None):
    w = gguf.GGUFWriter(str(path), "llama")
    # Enough llama hyper-parameters for transformers to accept the file.
    w.add_context_length(64); w.add_embedding_length(8); w.add_block_count(1)
    w.add_feed_forward_length(16); w.add_head_count(2); w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model); w.add_tokenizer_pre(pre)
    w.add_token_list(tokens); w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A llama-style (sentencepiece BPE with byte fallback) GGUF: <unk>, <s>, </s>,
    <0x00>..<0xFF>, learned pieces scored by merge order, one user-defined token."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = _train(models.BPE(unk_token="<unk>", byte_fallback=True),
                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                 specials)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 260) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(259, len(tokens))]
    path = tmp_path_factory.mktemp("sp") / "sp.gguf"
    _write_gguf(path, "llama", tokens, types, scores=scores, chat_template=CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def byte_level_gguf(tmp_path_factory):
    """A gpt2-style (byte-level BPE) GGUF with the qwen2 pre-tokenizer split."""
    specials = ["<|endoftext|>", "<s>", "</s>"]
    tok = _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), specials,
                 alphabet=pre_tokenizers.ByteLevel.alphabet())
    data = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])] + ["<tool>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    path = tmp_path_factory.mktemp("bl") / "bl.gguf"
    _write_gguf(path, "gpt2", tokens, types, merges=merges, pre="qwen2", add_bos=False,
                chat_template=CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face tokenizer directory: tokenizer.json whose post-processor adds <s>,
    tokenizer_config.json (special tokens, chat template), generation_config.json."""
    tok = _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                 ["<unk>", "<s>", "</s>", "<|eot|>"], alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<tool>", normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("hf")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return path


def _hf(path):
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _hf_chat_ids(hf, messages):
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


# -- encode / decode / chat against transformers --------------------------------------
@pytest.mark.parametrize("which", ["sentencepiece_gguf", "byte_level_gguf", "hf_dir"])
def test_matches_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, hf = Tokenizer.from_pretrained(path), _hf(path)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_id == hf.eos_token_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.apply_chat_template(MESSAGES) == _hf_chat_ids(hf, MESSAGES)
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == hf.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)


def test_special_token_flags(sentencepiece_gguf, byte_level_gguf, hf_dir):
    sp = Tokenizer.from_pretrained(sentencepiece_gguf)
    assert sp.add_bos_token and sp.encode("Hello")[0] == sp.bos_token_id == 1   # llama default
    # The user-defined token is matched whole but is not special: skipping keeps it.
    tool = sp.token_to_id("<tool>")
    assert tool in sp.encode("a <tool> b") and tool not in sp.all_special_ids
    bl = Tokenizer.from_pretrained(byte_level_gguf)
    assert not bl.add_bos_token and bl.encode("Hello")[0] != bl.bos_token_id
    # <|endoftext|> is control: llama.cpp ends generation on it as on eos.
    assert bl.eos_token_ids == [2, 0]
    hf = Tokenizer.from_pretrained(hf_dir)
    assert hf.add_bos_token           # from the tokenizer.json post-processor
    assert hf.eos_token_ids == [2, 3]  # tokenizer eos + generation_config eos ids


def test_eos_ids_from_generation_config_and_config_json(hf_dir, tmp_path):
    # The tokenizer is the engine's only source of eos ids, so it reads both files
    # (ModelConfig reads none): tokenizer eos 2, generation_config [4, 2], config.json 3.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2, 3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2, 4, 3]


def test_gguf_eos_id_whose_text_is_not_a_vocabulary_entry(tmp_path):
    # A byte-level GGUF whose eos (id 2) is a control token spelled outside the byte
    # alphabet (a raw space): it is not added as a special token, so its text maps to no
    # id; the id itself must still end generation. <|eot|> (id 3) is the eot id.
    tokens = ["<|endoftext|>", "<s>", "</s> x", "<|eot|>"] + [
        c for c in map(chr, range(33, 127))] + ["Ġ", "ab"]
    types = [3, 3, 3, 3] + [1] * (len(tokens) - 4)
    path = tmp_path / "eos.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2"); w.add_token_list(tokens); w.add_token_types(types)
    w.add_token_merges(["a b"]); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_eot_token_id(3)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_id is None          # "</s> x" is not a token of the backend
    assert tok.eos_token_ids == [2, 3, 0]    # eos and eot by id, then llama.cpp's EOG <|endoftext|>


def test_chat_template_errors(hf_dir):
    tok = Tokenizer.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template(["not a dict"])
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(MESSAGES, chat_template="{% for %}")
    # HF's helpers and filters: strftime_now, tojson keeping non-ASCII, {% generation %}.
    text = tok.apply_chat_template(
        [{"role": "user", "content": "世界"}], tokenize=False,
        chat_template="{{ strftime_now('%Y') | length }} {{ messages | tojson }}"
                      "{% generation %}!{% endgeneration %}")
    assert text == '4 [{"role": "user", "content": "世界"}]!'


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="bad.gguf"):
        Tokenizer.from_pretrained(bad)
    no_vocab = tmp_path / "novocab.gguf"
    w = gguf.GGUFWriter(str(no_vocab), "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_pretrained(no_vocab)


def test_ids_past_the_vocabulary_decode_as_nothing(hf_dir):
    # A model's embedding may be padded past its tokenizer (Qwen2.5); such ids decode as
    # '' (as transformers decodes them), in a full decode and in the streaming one.
    tok, hf = Tokenizer.from_pretrained(hf_dir), _hf(hf_dir)
    ids = tok.encode("Hello world")
    padded = [ids[0], tok.vocab_size, *ids[1:], tok.vocab_size + 100]
    assert tok.decode(padded) == hf.decode(padded, skip_special_tokens=True) == tok.decode(ids) != ""
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(t) for t in padded) + detok.flush() == tok.decode(ids)
    with pytest.raises(ValueError, match="negative"):
        tok.decode([1, -1])


# -- streaming detokenizer -------------------------------------------------------------
STREAM_TEXT = "Héllo 👋 world, 世界 and 😀😀 done. naïve 🇫🇷"


@pytest.mark.parametrize("which", ["sentencepiece_gguf", "byte_level_gguf"])
def test_incremental_detokenizer(which, request):
    tok = Tokenizer.from_pretrained(request.getfixturevalue(which))
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    # Multi-byte characters really are split across tokens here (else nothing is tested).
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == tok.decode(ids) == STREAM_TEXT
    assert detok.flush() == ""
    assert detok.output_token_ids == ids


def test_incremental_detokenizer_with_prompt_and_specials(sentencepiece_gguf, byte_level_gguf):
    for path in (sentencepiece_gguf, byte_level_gguf):
        tok = Tokenizer.from_pretrained(path)
        prompt = tok.encode("The lazy dog says")
        out = tok.encode(" hello 世界 </s> again", add_special_tokens=False)
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
            text = "".join(detok.add(t) for t in out) + detok.flush()
            # The prompt is context only: the stream is the full decode minus the prompt's text.
            full = tok.decode(prompt + out, skip_special_tokens=skip)
            assert text == full[len(tok.decode(prompt, skip_special_tokens=skip)):]
            assert ("</s>" in text) == (not skip)


def test_incremental_detokenizer_incomplete_tail(byte_level_gguf):
    tok = Tokenizer.from_pretrained(byte_level_gguf)
    ids = tok.encode("ok 😀", add_special_tokens=False)
    # Cut inside the emoji: the held-back bytes only come out at flush, as U+FFFD,
    # exactly as a full decode shows them.
    cut = next(i for i in range(len(ids), 0, -1) if tok.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add(t) for t in ids[:cut])
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(ids[:cut])


def test_find_stop_string():
    assert find_stop_string("Hello wor", 3, ["world"]) is None
    assert find_stop_string("Hello world!", 3, ["world"]) == ("world", 6)
    assert find_stop_string("Hello world!", 3, ["world"], include_stop_str_in_output=True) == ("world", 11)
    # Earliest match wins; text before the new chars is not searched again.
    assert find_stop_string("abc STOP x END", 8, ["END", "STOP"]) == ("STOP", 4)
    assert find_stop_string("STOP and more", 4, ["STOP"]) is None
    assert find_stop_string("anything", 0, ["thing"]) is None


def test_chat_message_content_forms(hf_dir):
    """content None renders as '', OpenAI text parts are joined with newlines (vLLM's
    rules); other shapes are ValueErrors naming the message and field."""
    tok = Tokenizer.from_pretrained(hf_dir)
    render = lambda messages: tok.apply_chat_template(messages, tokenize=False)  # noqa: E731
    assert render([{"role": "user", "content": None}]) == render([{"role": "user", "content": ""}])
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert (render([{"role": "system", "content": "S"}, {"role": "user", "content": parts}])
            == render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hello\nworld"}]))
    bad = [
        ([{"role": 5, "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], r"messages\[1\]\.role"),
        ([{"role": "user", "content": 7}], r"messages\[0\]\.content must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         r"messages\[0\]\.content\[0\]\.type 'image_url'"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], r"messages\[0\]\.content\[0\]\.text"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\] must be a dict"),
        ("hello", r"messages must be a list"),
    ]
    for messages, match in bad:
        with pytest.raises(ValueError, match=match):
            tok.apply_chat_template(messages)


def test_gguf_is_known_by_its_magic_not_its_name(byte_level_gguf, tmp_path):
    import shutil
    renamed = tmp_path / "weights.bin"
    shutil.copy(byte_level_gguf, renamed)
    ours, original = Tokenizer.from_pretrained(renamed), Tokenizer.from_pretrained(byte_level_gguf)
    text = "Hello world, 123"
    assert ours.encode(text) == original.encode(text) and ours.vocab_size == original.vocab_size
    fake = tmp_path / "fake.gguf"
    fake.write_text("just text")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_pretrained(fake)
