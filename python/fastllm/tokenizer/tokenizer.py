"""Tokenizer: text <-> token ids, chat templates and the ids that end generation.

    tok = Tokenizer.from_pretrained("path/to/hf_dir")        # tokenizer.json (+ configs)
    tok = Tokenizer.from_pretrained("model.Q4_1.gguf")       # the GGUF's embedded vocab
    ids = tok.encode("Hello")                                # BOS added if the model wants it
    tok.decode(ids)
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # prompt token ids

Encoding runs the `tokenizers` library (Rust) without its post-processor; BOS/EOS are
added here from add_bos_token/add_eos_token, so a Hugging Face directory and a GGUF
file follow one rule. Streaming decode lives in `fastllm.tokenizer.detokenizer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from tokenizers import Tokenizer as _Backend

from fastllm.tokenizer.chat_template import render_chat_template
from fastllm.config import read_json as _read_json


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value, where: str) -> list[int]:
    if value is None:
        return []
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ids):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


def _starts_with_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for tokenizers whose config asks for it.
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


class Tokenizer:
    def __init__(self, backend: _Backend, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, unk_token: Optional[str] = None,
                 pad_token: Optional[str] = None, add_bos_token: bool = False,
                 add_eos_token: bool = False, chat_template: Union[str, dict, None] = None,
                 extra_eos_token_ids: Iterable[int] = (), clean_up_tokenization_spaces: bool = False,
                 name_or_path: str = ""):
        self.backend = backend
        self.name_or_path = name_or_path
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
        self.add_eos_token = bool(add_eos_token) and self.eos_token_id is not None
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        eos = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(extra_eos_token_ids)
        self._eos_token_ids = list(dict.fromkeys(int(i) for i in eos))   # ordered, no repeats

    # -- loading -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """From a Hugging Face directory (tokenizer.json, tokenizer_config.json,
        generation_config.json, chat_template.jinja) or a .gguf file."""
        path = Path(path)
        # A GGUF is known by its magic bytes, as the model loader knows it, not its name.
        if path.is_file() and _starts_with_gguf_magic(path):
            return cls._from_gguf(path)
        if path.is_dir():
            return cls._from_hf_dir(path)
        if path.is_file():
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic) or a model directory")
        raise ValueError(f"{path}: no such tokenizer file or directory")

    @classmethod
    def _from_gguf(cls, path: Path) -> "Tokenizer":
        from fastllm.tokenizer.gguf_vocab import load_gguf_tokenizer

        data = load_gguf_tokenizer(path)
        return cls(data.backend, bos_token=data.bos_token, eos_token=data.eos_token,
                   unk_token=data.unk_token, pad_token=data.pad_token,
                   add_bos_token=data.add_bos_token, add_eos_token=data.add_eos_token,
                   chat_template=data.chat_template, extra_eos_token_ids=data.extra_eos_token_ids,
                   name_or_path=str(path))

    @classmethod
    def _from_hf_dir(cls, path: Path) -> "Tokenizer":
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            hint = (" (only a sentencepiece tokenizer.model is there: save the tokenizer with "
                    "transformers' AutoTokenizer(...).save_pretrained to get tokenizer.json)"
                    if (path / "tokenizer.model").is_file() else "")
            raise ValueError(f"{path}: tokenizer.json is missing{hint}")
        try:
            backend = _Backend.from_file(str(tokenizer_json))
        except BaseException as e:   # also a panic inside tokenizers (pyo3 PanicException)
            if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
                raise
            raise ValueError(f"{tokenizer_json}: not a valid tokenizers file ({e})") from None

        config_path = path / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))

        # Whether to add BOS/EOS: the config's flags when it has them, otherwise what
        # tokenizer.json's post-processor would do.
        probe_with = backend.encode("a", add_special_tokens=True).ids
        probe_without = backend.encode("a", add_special_tokens=False).ids
        added = len(probe_with) > len(probe_without)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = added and bos is not None and probe_with[0] == backend.token_to_id(bos)
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = added and eos is not None and probe_with[-1] == backend.token_to_id(eos)

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):   # [{"name": ..., "template": ...}, ...]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                       and isinstance(t.get("template"), str) for t in chat_template):
                raise ValueError(f"{config_path}: chat_template must be a string or a list of "
                                 f"{{'name': str, 'template': str}}")
            chat_template = {t["name"]: t["template"] for t in chat_template}
        elif chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{config_path}: chat_template must be a string, got "
                             f"{type(chat_template).__name__}")
        if (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            chat_template = _read_json(path / "chat_template.json").get("chat_template", chat_template)

        # The single source of the ids that end generation (ModelConfig reads none): the
        # tokenizer's eos, every eos generation_config.json lists (Llama 3 Instruct:
        # <|end_of_text|>, <|eom_id|>, <|eot_id|>) and config.json's.
        extra_eos = []
        for name in ("generation_config.json", "config.json"):
            if (path / name).is_file():
                extra_eos += _id_list(_read_json(path / name).get("eos_token_id"), str(path / name))

        return cls(backend, bos_token=bos, eos_token=eos, unk_token=_token_text(config.get("unk_token")),
                   pad_token=_token_text(config.get("pad_token")), add_bos_token=add_bos,
                   add_eos_token=add_eos, chat_template=chat_template, extra_eos_token_ids=extra_eos,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   name_or_path=str(path))

    # -- vocabulary ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (HF's len(tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation, the engine's only source of them: the tokenizer's
        eos, the eos ids of generation_config.json and config.json and (GGUF) eos/eot/eom
        and the end-of-generation tokens llama.cpp recognises."""
        return list(self._eos_token_ids)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    # -- text <-> ids --------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, token_ids, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        ids = [int(t) for t in token_ids]
        vocab_size = self.vocab_size
        if any(t < 0 for t in ids):
            raise ValueError(f"token_ids holds negative ids: {[t for t in ids if t < 0][:5]}")
        # Ids past the vocabulary (an embedding padded past the tokenizer) decode as '',
        # as transformers decodes them.
        ids = [t for t in ids if t < vocab_size]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, token_ids) -> list[Optional[str]]:
        return [self.backend.id_to_token(int(t)) for t in token_ids]

    # -- chat ----------------------------------------------------------------------
    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: Optional[list] = None,
                            chat_template: Union[str, dict, None] = None, **kwargs):
        """The prompt for a conversation: token ids (tokenize=True) or text. As in
        transformers, the rendered text is tokenized without adding BOS again: templates
        that want it write {{ bos_token }} themselves."""
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "unk_token": self.unk_token, "pad_token": self.pad_token}
        text = render_chat_template(chat_template or self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt, tools=tools,
                                    **{**special, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos_token_ids={self.eos_token_ids})")
