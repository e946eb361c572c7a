"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence
of the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min),
over prompt + output. Pure CPU work on token ids (numpy), run by the scheduler.
Repetitive text (edits, summaries, code) hits often; a miss proposes nothing and the
sequence decodes one token as usual."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow token_ids (empty when no n-gram matches)."""
        num = len(token_ids)
        if k <= 0 or num < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            suffix = tokens[num - n:]
            # windows[i] = tokens[i:i+n] for i <= num - 1 - n: every earlier n-gram
            # (the suffix itself excluded) with at least one token after it to copy.
            windows = sliding_window_view(tokens[:num - 1], n)        # [num - n, n]
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n                              # the latest match
                return tokens[start:start + k].tolist()
        return []
