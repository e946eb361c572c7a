"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's embedded vocabulary.

A GGUF carries no tokenizer.json, only llama.cpp's metadata: tokenizer.ggml.model
("gpt2" = byte-level BPE, "llama" = sentencepiece BPE), tokens, merges (gpt2) or scores
(llama), token types, the pre-tokenizer name and special token ids. We rebuild the
tokenizer the model was trained with from those, the way llama.cpp reads them (and
transformers' GGUF loader, which the tests compare against).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes of the byte-level pre-tokenizers, keyed by tokenizer.ggml.pre
# (llama.cpp's names; the patterns are those of the models' own tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"],
                    _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
}
# GPT-2's regex after splitting every digit on its own (HF: Digits(individual_digits)).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# llama.cpp keeps whole words that are in the vocabulary for these (HF: ignore_merges).
_IGNORE_MERGES_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}

# Control tokens llama.cpp treats as end of generation even when no id says so.
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>"}


@dataclass
class GGUFTokenizerData:
    backend: Tokenizer
    bos_token: Optional[str]
    eos_token: Optional[str]
    unk_token: Optional[str]
    pad_token: Optional[str]
    add_bos_token: bool
    add_eos_token: bool
    chat_template: Optional[str]
    extra_eos_token_ids: list = field(default_factory=list)   # eot/eom + llama.cpp's EOG set


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_metadata(path: Path) -> dict:
    """The tokenizer.* metadata (and general.architecture), parsed by the model loader's
    one GGUF metadata reader."""
    from fastllm.model.gguf_loader import open_gguf, read_metadata
    return read_metadata(open_gguf(path), prefixes=("tokenizer.", "general.architecture"))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece GGUFs store scores, not merges: every split of a token into two
    vocabulary pieces is a merge, ranked by the merged token's score (best first),
    exactly as transformers' `generate_merges` does."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    token_scores = {}
    for t, s in zip(tokens, scores):
        token_scores.setdefault(t, s)
    merges = []
    for token, score in token_scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level(meta: dict, tokens: list[str]) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("GGUF tokenizer.ggml.merges is missing (needed for a 'gpt2' tokenizer)")
    merges = []
    for i, merge in enumerate(meta["tokenizer.ggml.merges"]):
        left, _, right = merge.partition(" ")
        if not left or not right or left not in vocab or right not in vocab or left + right not in vocab:
            raise ValueError(f"GGUF metadata tokenizer.ggml.merges[{i}] = {merge!r} is not two "
                             f"vocabulary pieces whose join is in the vocabulary")
        merges.append((left, right))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               ignore_merges=pre in _IGNORE_MERGES_PRES))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict, tokens: list[str], add_space_prefix: bool, unk: Optional[str]) -> Tokenizer:
    if "tokenizer.ggml.scores" not in meta:
        raise ValueError("GGUF tokenizer.ggml.scores is missing (needed for a 'llama' tokenizer)")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = _merges_from_scores(tokens, list(meta["tokenizer.ggml.scores"]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    # "▁" marks a space; sentencepiece prepends one to the text (add_space_prefix).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _check_metadata(meta: dict) -> None:
    """Types and lengths of the vocabulary metadata (the file is untrusted): errors name
    the key. The tokenizers library panics (not even an Exception) on some malformed
    vocabularies, so nothing malformed may reach it."""
    def fail(key, why):
        raise ValueError(f"GGUF metadata {key} {why}")

    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        fail("tokenizer.ggml.tokens", "must be a non-empty array of strings")
    for key, item_types in (("tokenizer.ggml.token_type", (int,)), ("tokenizer.ggml.scores", (int, float))):
        values = meta.get(key)
        if values is None:
            continue
        if (not isinstance(values, list) or len(values) != len(tokens)
                or not all(isinstance(v, item_types) and not isinstance(v, bool) for v in values)):
            fail(key, f"must be an array of {len(tokens)} numbers (one per token)")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        fail("tokenizer.ggml.merges", "must be an array of strings")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            fail(key, f"must be a string, got {meta[key]!r}")
    for key in _TOKEN_ID_KEYS:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            fail(f"tokenizer.ggml.{key}", f"must be an integer token id, got {value!r}")


_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                  "eot_token_id", "eom_token_id")


def _token_id(meta: dict, key: str, num_tokens: int) -> Optional[int]:
    """A special token id, or None when absent or outside the vocabulary (llama.cpp
    ignores such an id too, with a warning)."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not 0 <= value < num_tokens:
        logger.warning("GGUF tokenizer.ggml.%s = %d is outside the vocabulary (%d tokens); ignored",
                       key, value, num_tokens)
        return None
    return value


def load_gguf_tokenizer(path) -> GGUFTokenizerData:
    path = Path(path)
    meta = _read_metadata(path)
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: GGUF has no embedded vocabulary (tokenizer.ggml.tokens)")
    try:
        _check_metadata(meta)
        return _build(meta, path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except BaseException as e:  # a panic inside tokenizers (pyo3 PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise ValueError(f"{path}: the embedded vocabulary cannot be built ({type(e).__name__}: {e})") from None


def _build(meta: dict, path: Path) -> GGUFTokenizerData:
    model_type = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def token_at(key: str) -> Optional[str]:
        index = _token_id(meta, key, len(tokens))
        return None if index is None else tokens[index]

    unk = token_at("unknown_token_id")
    if model_type == "gpt2":
        backend = _byte_level(meta, tokens)
        # A byte-level vocabulary spells every real token in its byte alphabet; a
        # "control" token outside it is a converter mislabel, and adding it would grow
        # the vocabulary past the model's embedding (transformers skips these too).
        alphabet = set(bytes_to_unicode().values())
        is_spelled = lambda t: set(t) <= alphabet  # noqa: E731
        default_add_bos = False
    elif model_type == "llama":
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece(meta, tokens, add_space_prefix, unk)
        is_spelled = lambda t: True  # noqa: E731
        default_add_bos = True       # llama.cpp adds BOS to a sentencepiece vocab by default
    else:
        raise ValueError(f"{path}: unsupported GGUF tokenizer.ggml.model {model_type!r} "
                         "(supported: 'gpt2', 'llama')")

    # Control / unknown tokens are special (matched whole, skipped when decoding with
    # skip_special_tokens); user-defined ones are matched whole but decoded as text.
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN) and is_spelled(t)]
    backend.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        backend.add_tokens(user)

    # The single source of the ids that end generation (the model config reads none):
    # eos by id (its text may not be in a byte-level vocabulary), eot/eom, and the
    # control tokens llama.cpp treats as end of generation.
    extra_eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if _token_id(meta, key, len(tokens)) is not None:
            extra_eos.append(meta[f"tokenizer.ggml.{key}"])
    extra_eos += [i for i, (t, ty) in enumerate(zip(tokens, types))
                  if ty == _CONTROL and t in _EOG_TEXTS]

    return GGUFTokenizerData(
        backend=backend,
        bos_token=token_at("bos_token_id"), eos_token=token_at("eos_token_id"),
        unk_token=unk, pad_token=token_at("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        extra_eos_token_ids=extra_eos,
    )
