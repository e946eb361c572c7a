"""The scheduler's half of speculative decoding: how many draft tokens a decoding
sequence may have this step, and (n-gram method) what they are."""
from __future__ import annotations

from typing import Optional

from fastllm.spec_decode.config import SpeculativeConfig, speculation_allowed
from fastllm.spec_decode.ngram import NgramProposer


class SpecPlanner:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.k = config.num_speculative_tokens
        self.ngram = (NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
                      if config.method == "ngram" else None)

    def max_drafts(self, seq, budget: int, max_new_tokens: int, max_model_len: int) -> int:
        """Drafts seq may carry this step: 0 unless it is decoding (its one uncomputed
        token is a sampled one), may speculate (speculation_allowed, min_tokens reached),
        and has room -- the step's token budget, output tokens left to generate (a draft
        past max_tokens could never be kept), positions left in max_model_len."""
        params = seq.group.sampling_params
        num_output = seq.num_output_tokens
        if (seq.num_uncomputed_tokens != 1 or num_output == 0 or not seq.group.forked
                or num_output < params.min_tokens or not speculation_allowed(params)):
            return 0
        return max(0, min(self.k, budget - 1, max_new_tokens - num_output - 1,
                          max_model_len - seq.num_tokens))

    def propose(self, token_ids: list[int], k: int) -> Optional[list[int]]:
        """n-gram: up to k drafts (maybe none); draft model: None, its proposer fills
        the k reserved slots after scheduling."""
        if self.ngram is None:
            return None
        return self.ngram.propose(token_ids, k)
