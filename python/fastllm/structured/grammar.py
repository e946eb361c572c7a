"""One sample's grammar state: an xgrammar GrammarMatcher behind the few calls the
engine makes (accept sampled tokens, fill its bitmask row, fork, roll back)."""
from __future__ import annotations


class StructuredOutputGrammar:
    """Advanced by the scheduler with each token appended to its sequence, so its state is
    always that of the sequence's output tokens (preemption by recompute or swap keeps it:
    the output tokens do not change)."""

    def __init__(self, matcher):
        self._matcher = matcher
        self.num_processed_tokens = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it (the
        matcher is then unchanged)."""
        if not self._matcher.accept_token(int(token_id)):
            return False
        self.num_processed_tokens += 1
        return True

    def accept_tokens(self, token_ids) -> bool:
        """Advance by several tokens in order; stops at (and returns False on) the first
        token the grammar refuses, the ones before it stay accepted."""
        return all(self.accept_token(t) for t in token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Forget the last num_tokens accepted tokens (speculative decoding: rejected drafts)."""
        if not 0 <= num_tokens <= self.num_processed_tokens:
            raise ValueError(f"rollback num_tokens must be in [0, {self.num_processed_tokens}], "
                             f"got {num_tokens}")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_processed_tokens -= num_tokens

    def fill_bitmask(self, bitmask, index: int) -> None:
        """Write the allowed next tokens into row `index` of bitmask ([R, ceil(V/32)] int32,
        CPU): bit t % 32 of word t // 32 is set when token t may come next."""
        self._matcher.fill_next_token_bitmask(bitmask, index)

    @property
    def matcher(self):
        """The xgrammar GrammarMatcher (for the manager's batched bitmask fill)."""
        return self._matcher

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted its stop token: nothing more can follow."""
        return self._matcher.is_terminated()

    @property
    def is_completed(self) -> bool:
        """The output so far is a complete match (only a stop token may follow, or more)."""
        return self._matcher.is_completed()

    def fork(self) -> "StructuredOutputGrammar":
        """An independent copy of this state (n > 1: each sample has its own)."""
        copy = StructuredOutputGrammar(self._matcher.fork())
        copy.num_processed_tokens = self.num_processed_tokens
        return copy
