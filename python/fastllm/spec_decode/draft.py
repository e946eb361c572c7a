"""Draft-model proposals: a second, smaller model sharing the target's tokenizer
proposes k tokens per speculating sequence, greedily (argmax), before the target's step.

Its KV cache mirrors the target's: the same block ids, block tables and swap block ids
index a separate physical cache of the draft's shape, so the BlockManager's allocation,
prefix cache, forks, swaps, rollback and freeing cover both. To keep the mirror exact,
the draft feeds every token the target feeds, at the same slots (prefill chunks and
non-speculating decodes included), and applies the same block moves. For a sequence
reserving k lookahead slots it then feeds x_1..x_k one at a time: x_j's logits give
x_{j+1}, and x_k is fed too so that when every draft is accepted the draft's KV already
covers them.

Drafts are deterministic given the context, so verification treats q as one-hot
(rejection_sampler), which keeps the target distribution exact at any temperature.
"""
from __future__ import annotations

import torch

from fastllm.engine import kv_cache
from fastllm.engine.input_batch import InputBatch
from fastllm.engine.step_data import ScheduledSeq, SchedulerOutput
from fastllm.model.layers import AttentionSpec


def load_draft(path: str, target_config, *, device, dtype):
    """(model, config) of the draft checkpoint, checked against the target's vocabulary."""
    from fastllm.model.loader import load_for_engine
    loaded = load_for_engine(path, dtype=dtype, device=device)
    if loaded.config.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config.model {path!r} has vocab_size "
                         f"{loaded.config.vocab_size}, the target model {target_config.vocab_size}: "
                         f"a draft model must share the target's tokenizer and vocabulary")
    return loaded.model, loaded.config


class DraftProposer:
    def __init__(self, model, model_config, engine_config, *, num_blocks: int,
                 num_swap_blocks: int, device, dtype, valid_vocab_size: int):
        self.model = model
        self.model_config = model_config
        self.device = torch.device(device)
        self.valid_vocab_size = valid_vocab_size
        self.kv = kv_cache.KVCache(model_config, engine_config, num_blocks, device=self.device,
                                   dtype=dtype, num_swap_blocks=num_swap_blocks)
        self.inputs = InputBatch(self.device, engine_config.block_size, engine_config.max_num_seqs,
                                 model_config.vocab_size)

    def close(self) -> None:
        self.kv.close()

    @torch.inference_mode()
    def propose(self, out: SchedulerOutput) -> None:
        """Apply the step's block moves to the draft cache, feed the step's tokens, and
        append up to num_lookahead drafts to each speculating ScheduledSeq's token_ids."""
        self.kv.apply_cache_ops(out)
        if not out.scheduled:
            return
        nxt = self._forward(out.scheduled)                  # [S] each sequence's next-token argmax
        spec = [(s, t) for s, t in zip(out.scheduled, nxt) if s.num_lookahead]
        seqs, nxt = [s for s, _ in spec], [t for _, t in spec]
        while seqs:
            for s, t in zip(seqs, nxt):
                s.token_ids.append(t)
                s.num_draft_tokens += 1
            # Feed the new drafts: their KV, and their logits give the next ones.
            fed = self._forward([_one_token(s) for s in seqs])
            more = [i for i, s in enumerate(seqs) if s.num_draft_tokens < s.num_lookahead]
            seqs, nxt = [seqs[i] for i in more], [fed[i] for i in more]

    def _forward(self, scheduled: list[ScheduledSeq]) -> list[int]:
        spec = AttentionSpec.of(self.model_config, self.kv.kv_caches[0][0])
        input_ids, positions, meta = self.inputs.prepare(scheduled, spec)
        logits = self.model(input_ids, positions, self.kv.kv_caches, meta)    # [S, V]
        return logits[:, :self.valid_vocab_size].argmax(dim=-1).tolist()


def _one_token(s: ScheduledSeq) -> ScheduledSeq:
    """s's last draft alone, at its position (s.start + tokens fed before it)."""
    pos = s.start + len(s.token_ids) - 1
    return ScheduledSeq(s.request_id, s.seq_id, s.token_ids[-1:], pos, s.block_table, 0, 0, None, 0, 0)
