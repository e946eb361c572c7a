"""A runner's pipeline-parallel plumbing: the activations between stages, the last stage's
logits to the driver, and the steps begun and not yet finished.

Per step, stage p > 0 receives (hidden, residual) [2, T, hidden] from stage p - 1 before
its forward pass, and every stage but the last sends its own on. The last stage computes
the logits but the driver (rank 0, on the first stage) samples: the last stage's TP rank
0 sends them, [S, vocab] float32, to pp rank 0 of its PP group (the driver's group).

Sends do not wait for the receiver (Communicator.isend): with microbatches in flight the
driver sends step k+1's activations while the last stage sends step k's logits back, and
two blocking gloo sends facing each other never return. A step's sends are waited for
when it finishes. Steps finish in the order they began, which is also the order the
point-to-point messages arrive in.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

import torch

from fastllm.distributed.parallel_state import ParallelContext


@dataclass
class PendingStep:
    sampling: object                  # the driver's SamplingStep (None: nothing sampled, or not the driver)
    logits: Optional[torch.Tensor]    # [S, V] float32 on the last stage, else None
    num_rows: int                     # S: scheduled sequences
    any_sampled: bool                 # whether any row is sampled (every rank knows from the schedule)
    sends: list = field(default_factory=list)   # in-flight isend handles (and their tensors)


class PipelineSteps:
    def __init__(self, parallel: ParallelContext):
        self.parallel = parallel
        self._pending: collections.deque[PendingStep] = collections.deque()

    def recv_activations(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> Optional[torch.Tensor]:
        """[2, T, hidden] (hidden, residual) from the previous stage; None on the first."""
        pp = self.parallel.pp
        if pp.rank == 0:
            return None
        both = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        return pp.recv(both, pp.rank - 1)

    def push(self, step: PendingStep, output: Optional[torch.Tensor]) -> None:
        """After this rank's forward pass: output is the logits on the last stage, else the
        activations [2, T, hidden] for the next stage."""
        p = self.parallel
        if not p.is_last_stage:
            step.sends.append((p.pp.isend(output, p.pp.rank + 1), output))
        elif p.pp.world_size > 1 and p.tp.rank == 0 and step.any_sampled:
            step.sends.append((p.pp.isend(output, 0), output))
        step.logits = output if p.is_last_stage else None
        self._pending.append(step)

    def pop(self, vocab_size: int, device: torch.device):
        """The oldest begun step, its sends complete, as (sampling, logits [S, V]) on the
        driver (received from the last stage); (None, None) on other ranks."""
        step = self._pending.popleft()
        for handle, _ in step.sends:
            handle.wait()
        if not self.parallel.is_driver:
            return None, None
        logits = step.logits
        if self.parallel.pp.world_size > 1 and step.any_sampled:
            logits = torch.empty((step.num_rows, vocab_size), dtype=torch.float32, device=device)
            self.parallel.pp.recv(logits, self.parallel.pp.world_size - 1)
        return step.sampling, logits

    def __len__(self) -> int:
        return len(self._pending)
