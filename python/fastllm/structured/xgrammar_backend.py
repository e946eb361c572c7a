"""The xgrammar side: a StructuredOutputsParams -> its key and its xgrammar Grammar
(parsed, so a bad schema / regex / grammar fails at once), and the compiler that turns a
Grammar into token masks for one tokenizer.

Parsing is cheap (text -> grammar rules); compiling is the costly part (every vocabulary
token against the grammar's states: tens to hundreds of milliseconds for a 128k
vocabulary), which is why the manager runs it in a thread pool.
"""
from __future__ import annotations

import json
from typing import Optional

import xgrammar as xgr

from fastllm.sampling_params import StructuredOutputsParams

# xgrammar's own JSON-object schema: any object, any keys.
_JSON_OBJECT_SCHEMA = '{"type": "object"}'


def grammar_key(params: StructuredOutputsParams) -> tuple:
    """Hashable identity of the constraint: equal keys compile to the same grammar."""
    kind = params.kind
    if kind == "json":
        value = params.json if isinstance(params.json, str) else _dump_schema(params.json)
    elif kind == "choice":
        value = tuple(params.choice)
    elif kind == "json_object":
        value = None
    else:
        value = getattr(params, kind)
    return (kind, value, params.disable_any_whitespace)


def _dump_schema(schema: dict) -> str:
    try:
        # Key order kept: xgrammar emits properties in the schema's order.
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"StructuredOutputsParams.json is not a JSON-serialisable schema: {e}") from None


def _choice_ebnf(choices: list[str]) -> str:
    # json.dumps writes a double-quoted literal whose escapes (\" \\ \n \uXXXX) GBNF shares.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def parse_grammar(params: StructuredOutputsParams) -> "xgr.Grammar":
    """The xgrammar Grammar of params; ValueError naming the field and xgrammar's reason."""
    kind = params.kind
    any_whitespace = not params.disable_any_whitespace
    field = "json" if kind == "json_object" else kind
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else _dump_schema(params.json)
            _check_schema_text(schema)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=any_whitespace,
                                                strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- xgrammar raises RuntimeError with its parser's message
        raise ValueError(f"StructuredOutputsParams.{field} is invalid: {_reason(e)}") from None


def _check_schema_text(schema: str) -> None:
    try:
        value = json.loads(schema)
    except ValueError as e:
        raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError("StructuredOutputsParams.json must be a JSON schema object, got "
                         f"{type(value).__name__}")


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix ('[time] file.cc:12: ')."""
    text = str(e).strip()
    head, sep, rest = text.partition(": ")
    if sep and ".cc:" in head:
        text = rest
    return text.splitlines()[0] if text else type(e).__name__


def tokenizer_info(tokenizer, vocab_size: int) -> "xgr.TokenizerInfo":
    """xgrammar's view of fastllm's tokenizer: its `tokenizers` backend (a Hugging Face
    directory's tokenizer.json or one rebuilt from a GGUF vocab) behind transformers' fast
    tokenizer wrapper, which xgrammar reads the vocabulary type (byte-level or byte
    fallback) from. vocab_size is the model's (padded) logits width: ids past the
    tokenizer are never allowed. Stop tokens are the tokenizer's eos ids."""
    from transformers import PreTrainedTokenizerFast
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(wrapped, vocab_size=vocab_size,
                                              stop_token_ids=list(tokenizer.eos_token_ids) or None)


def make_compiler(tokenizer, vocab_size: int, max_threads: int = 2,
                  cache_limit_bytes: Optional[int] = None) -> "xgr.GrammarCompiler":
    info = tokenizer_info(tokenizer, vocab_size)
    return xgr.GrammarCompiler(info, max_threads=max_threads,
                               cache_limit_bytes=-1 if cache_limit_bytes is None else cache_limit_bytes)


def new_matcher(compiled) -> "xgr.GrammarMatcher":
    return xgr.GrammarMatcher(compiled)


def batch_filler() -> "xgr.BatchGrammarMatcher":
    return xgr.BatchGrammarMatcher()
