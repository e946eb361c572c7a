"""The steps a runner has begun and not yet finished, and the logits' way to the driver.

With pipeline stages, the last stage computes a step's logits but the driver (rank 0, on
the first stage) samples: the last stage's TP rank 0 sends them, [S, vocab] float32, to
pp rank 0 of its PP group (the driver's group), and the driver receives them when it
finishes that step. Steps finish in the order they began (exec's microbatches keep
several in flight), which is also the order the point-to-point messages arrive in.
Without pipeline stages the driver's own forward pass left the logits here.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import torch

from fastllm.distributed.parallel_state import ParallelContext


@dataclass
class PendingStep:
    sampling: object                  # the driver's SamplingStep (None: nothing sampled, or not the driver)
    logits: Optional[torch.Tensor]    # [S, V] float32 on the last stage, else None
    num_rows: int                     # S: scheduled sequences
    any_sampled: bool                 # whether any row is sampled (every rank knows from the schedule)


class PipelineSteps:
    def __init__(self, parallel: ParallelContext):
        self.parallel = parallel
        self._pending: collections.deque[PendingStep] = collections.deque()

    def push(self, step: PendingStep) -> None:
        """After a rank's forward pass. The last stage's TP rank 0 sends its logits to
        the driver; only the driver keeps steps to finish."""
        p = self.parallel
        if p.pp.world_size > 1 and p.is_last_stage and p.tp.rank == 0 and step.any_sampled:
            p.pp.send(step.logits, 0)
        if p.is_driver:
            self._pending.append(step)

    def pop(self, vocab_size: int, device: torch.device):
        """The driver's oldest begun step as (sampling, logits [S, V]); (None, None) on
        other ranks."""
        if not self.parallel.is_driver:
            return None, None
        step = self._pending.popleft()
        logits = step.logits
        if self.parallel.pp.world_size > 1 and step.any_sampled:
            logits = torch.empty((step.num_rows, vocab_size), dtype=torch.float32, device=device)
            self.parallel.pp.recv(logits, self.parallel.pp.world_size - 1)
        return step.sampling, logits

    def __len__(self) -> int:
        return len(self._pending)
