"""Streaming detokenization and stop-string matching.

Decoding one token at a time is wrong twice over: a multi-byte UTF-8 character can be
split across tokens (decoding the first half alone gives U+FFFD), and sentencepiece
decoders drop a token's leading space at the start of a string. vLLM's scheme fixes
both with two offsets into the token ids:

    prefix_offset  start of a few tokens of context that were already emitted
    read_offset    end of what was emitted

Each step decodes ids[prefix_offset:] and ids[prefix_offset:read_offset]; the new text
is the difference, emitted only when it does not end in U+FFFD (an incomplete
character). The context makes spaces come out as in a full decode, so the deltas
concatenate to decode(output ids) -- `flush()` hands over anything still held back
when the sequence ends.
"""
from __future__ import annotations

from typing import Optional, Sequence

# Tokens of already-emitted context kept before read_offset (vLLM uses 5 for the prompt).
_INITIAL_CONTEXT = 5


class IncrementalDetokenizer:
    """Feed token ids one at a time (or a few), get the new text each time.

        detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
        for token_id in generated:
            delta = detok.add(token_id)      # "" while a character is incomplete
        delta = detok.flush()                # at the end: whatever was held back
        detok.output_text                    # all deltas so far, concatenated
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The prompt's last tokens are context only: their text is never emitted.
        context = list(prompt_token_ids)[-_INITIAL_CONTEXT:]
        self.token_ids: list[int] = context
        self.num_context_tokens = len(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.output_text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_ids) -> str:
        """Append one id (int) or several; returns the newly completed text."""
        if isinstance(token_ids, int):
            self.token_ids.append(token_ids)
        else:
            self.token_ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.output_text += delta
            return delta
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character stays U+FFFD, as in a
        full decode). Call when the sequence finishes."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_context_tokens:]


def find_stop_string(output_text: str, num_new_chars: int, stop: Sequence[str],
                     include_stop_str_in_output: bool = False) -> Optional[tuple[str, int]]:
    """Whether the text just added (the last num_new_chars of output_text) completes one
    of the stop strings. Returns (stop string, length to truncate output_text to), or
    None. Only the tail is searched (a stop string may start before the new text)."""
    if not stop or num_new_chars <= 0:
        return None
    best = None   # the earliest match wins when several stop strings complete at once
    for stop_str in stop:
        start = max(0, len(output_text) - num_new_chars - len(stop_str) + 1)
        index = output_text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    if best is None:
        return None
    stop_str, index = best
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index
