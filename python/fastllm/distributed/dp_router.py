"""Data-parallel routing: which engine replica takes a new request.

    router = DPRouter(num_replicas=2, block_size=16)
    replica = router.route("r0", prompt_token_ids)   # counted as waiting there
    router.mark_running("r0")                         # its first output arrived
    router.finish("r0")                               # finished, aborted or failed

A request goes to the replica with the lowest load score, 4 * waiting + running
(seeds/001: a waiting request costs a prefill, a running one a decode slot). The counts
are the ones this front end tracks from what it sent and what came back, so a burst of
requests routed before any replica reports is still spread. Among replicas whose scores
tie, prefix-cache affinity decides: the replica that last took a request sharing the
longest run of leading full KV blocks with this prompt, so requests with one system
prompt land where that prompt's KV is cached. Left over ties go to the lowest index.

Pure bookkeeping, no processes: engine/dp_client.py drives it.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional, Sequence

from fastllm.utils import check_positive_int

# Only a prompt's first blocks are hashed: a shared system prompt is a prefix, and this
# bounds the work per request (and the memory of the affinity map).
MAX_AFFINITY_BLOCKS = 16
# Prefix hashes remembered, least recently routed forgotten first.
MAX_AFFINITY_ENTRIES = 1 << 16
WAITING_WEIGHT = 4


def load_score(num_waiting: int, num_running: int) -> int:
    return WAITING_WEIGHT * num_waiting + num_running


def prefix_block_hashes(token_ids: Sequence[int], block_size: int,
                        max_blocks: int = MAX_AFFINITY_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's leading full blocks: entry i names blocks 0..i, so
    two prompts share entry i exactly when their first (i + 1) * block_size tokens match
    (up to hash collisions, which only cost a routing choice). Python hashes tuples of
    ints deterministically (no PYTHONHASHSEED salt), so the values are reproducible."""
    hashes, parent = [], 0
    num_full = min(len(token_ids) // block_size, max_blocks)
    for i in range(num_full):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


@dataclass
class ReplicaLoad:
    waiting: int = 0       # routed, no output yet
    running: int = 0       # has produced output, not finished

    @property
    def score(self) -> int:
        return load_score(self.waiting, self.running)


class DPRouter:
    def __init__(self, num_replicas: int, block_size: int):
        check_positive_int("num_replicas", num_replicas)
        check_positive_int("block_size", block_size)
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.loads = [ReplicaLoad() for _ in range(num_replicas)]
        self.excluded: set[int] = set()                  # replicas that take nothing new
        self._replica_of: dict[str, int] = {}
        self._started: set[str] = set()
        self._affinity: collections.OrderedDict[int, int] = collections.OrderedDict()

    # -- decisions -----------------------------------------------------------------------
    def choose(self, prompt_token_ids: Sequence[int]) -> int:
        """The replica a request with this prompt would go to now (nothing recorded)."""
        candidates = [i for i in range(self.num_replicas) if i not in self.excluded]
        if not candidates:
            raise RuntimeError("no data-parallel replica is accepting requests")
        best = min(self.loads[i].score for i in candidates)
        tied = [i for i in candidates if self.loads[i].score == best]
        if len(tied) == 1:
            return tied[0]
        match = self._longest_match(prompt_token_ids, set(tied))
        return match if match is not None else tied[0]

    def _longest_match(self, prompt_token_ids, among: set[int]) -> Optional[int]:
        for h in reversed(prefix_block_hashes(prompt_token_ids, self.block_size)):
            replica = self._affinity.get(h)
            if replica is not None and replica in among:
                return replica
        return None

    # -- bookkeeping ---------------------------------------------------------------------
    def route(self, request_id: str, prompt_token_ids: Sequence[int]) -> int:
        """Choose a replica for a new request and count it as waiting there."""
        if request_id in self._replica_of:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        replica = self.choose(prompt_token_ids)
        self._replica_of[request_id] = replica
        self.loads[replica].waiting += 1
        for h in prefix_block_hashes(prompt_token_ids, self.block_size):
            self._affinity[h] = replica
            self._affinity.move_to_end(h)
        while len(self._affinity) > MAX_AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return replica

    def mark_running(self, request_id: str) -> None:
        """The request produced output: it moves from waiting to running (idempotent)."""
        replica = self._replica_of.get(request_id)
        if replica is None or request_id in self._started:
            return
        self._started.add(request_id)
        self.loads[replica].waiting -= 1
        self.loads[replica].running += 1

    def finish(self, request_id: str) -> Optional[int]:
        """Forget a request (finished, aborted or failed); returns its replica, if known."""
        replica = self._replica_of.pop(request_id, None)
        if replica is None:
            return None
        if request_id in self._started:
            self._started.discard(request_id)
            self.loads[replica].running -= 1
        else:
            self.loads[replica].waiting -= 1
        return replica

    def replica_of(self, request_id: str) -> Optional[int]:
        return self._replica_of.get(request_id)

    def requests_on(self, replica: int) -> list[str]:
        return [rid for rid, r in self._replica_of.items() if r == replica]

    def exclude(self, replica: int) -> None:
        """Route nothing more to this replica (it died or is stopping)."""
        self.excluded.add(replica)
