"""Speculative decoding: proposals (n-gram prompt lookup, a draft model), their
verification by rejection sampling in the target model's step, and the config.

    LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    LLM(path, speculative_config={"method": "draft_model", "model": DRAFT, "num_speculative_tokens": 4})

Flow of one step (see docs/architecture.md): the scheduler gives a decoding sequence that
may speculate k lookahead KV slots; n-gram drafts are found there (CPU, token ids), draft
model drafts by DraftProposer.propose(SchedulerOutput) on the driver before execute();
the runner scores the k+1 positions in one forward pass and verify.py keeps 1..k+1
tokens; Scheduler.update appends them and rolls back the rejected tokens' KV.
"""
from fastllm.spec_decode.config import SpeculativeConfig, speculation_allowed

__all__ = ["SpeculativeConfig", "speculation_allowed"]
