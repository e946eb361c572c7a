"""LLMEngine.step with pipeline microbatches: up to max_concurrent_batches steps in flight.

With pipeline_parallel_size = M, one step at a time leaves M - 1 stages idle while the
others compute. Here each call submits a new step when fewer than M are in flight (the
driver's stage runs it and passes it on), and once the pipeline is full -- or nothing new
can be scheduled -- collects the oldest and updates the scheduler with it:

    call:     1    2    3    4 ...
    submit:   A    B    C    D          (disjoint sequences: the scheduler leaves out
    collect:  -    A    B    C           those of steps in flight)

Each step takes about 1/M of the unfinished sequences (at least one), so the M steps in
flight cover them all and the next step of a sequence is ready when its last one is back.
"""
from __future__ import annotations

import collections

from fastllm.profiling import nvtx_range
from fastllm.utils import cdiv


def pipelined_step(engine, queue: collections.deque) -> list:
    depth = engine.executor.max_concurrent_batches
    if len(queue) < depth:
        sched = _schedule_share(engine, depth)
        if not sched.is_empty:
            try:
                engine.executor.submit(sched)
            except BaseException:
                engine._abort_failed_step(sched, cache_ops_failed=True)
                raise
            queue.append(sched)
            if len(queue) < depth:
                return []                  # fill the pipeline first
    if not queue:
        return []
    sched = queue.popleft()
    try:
        result = engine.executor.collect(sched)
    except BaseException:
        engine._abort_failed_step(sched, cache_ops_failed=True)
        raise
    if not sched.scheduled:                # only block moves (or finished ids) this step
        return []
    try:
        with nvtx_range("update"):
            return engine._update(sched, result)
    except BaseException:
        engine._abort_failed_step(sched, cache_ops_failed=False)
        raise


def _schedule_share(engine, depth: int):
    sch = engine.scheduler
    active = min(len(sch.running) + len(sch.waiting) + len(sch.swapped), engine.config.max_num_seqs)
    with nvtx_range("schedule"):
        return sch.schedule(max_seqs=max(1, cdiv(active, depth)))
