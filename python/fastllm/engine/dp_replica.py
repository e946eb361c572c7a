"""One data-parallel engine replica: a process that builds a full engine the way `LLM`
does (its own scheduler, KV cache and runner; tensor parallel too once LLM is) and
serves the front end (engine/dp_client.py) over two one-way pipes, in plain data.

Front end -> replica, on `commands`:
    ("add", seq, request_id, prompt_text, prompt_token_ids, SamplingParams, delta, arrival_time)
    ("abort", [request_id, ...])
    ("stop",)
Replica -> front end, on `events`:
    ("ready", ReplicaInfo)                         once, after the engine is built
    ("startup_error", exception)                   instead of ready; the process exits
    ("accepted", [(seq, request_id, None | exception)])  each add's outcome, in order
    ("outputs", [RequestOutput], EngineStats | None)  a step's outputs (stats now and then)
    ("step_failed", [request_id, ...], message)    a step raised; those requests are gone

The replica stops on ("stop",) and also when the front end goes away (its end of
`commands` closes: EOF), so it never outlives it. Ctrl-C reaches the whole process group
(and a service manager may SIGTERM every process of the service): replicas ignore SIGINT
and SIGTERM, so that the front end drains them and stops them itself.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from dataclasses import dataclass, replace
from typing import Optional

logger = logging.getLogger(__name__)

# Stats go to the front end at most this often while busy, and once on going idle.
STATS_INTERVAL_S = 0.25


@dataclass
class ReplicaInfo:
    """What the front end needs from a built engine (all plain, picklable data)."""
    index: int
    pid: int
    device: str                    # as the replica sees it (cuda:0 is its first own GPU)
    visible_gpus: Optional[str]
    engine_config: object          # fastllm.config.EngineConfig, max_model_len resolved
    model_config: object           # fastllm.config.ModelConfig
    stats: object                  # EngineStats at start


def picklable_error(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling (ValueError keeps its type, so the
    front end still answers 400), else a RuntimeError carrying its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def replica_main(index: int, llm_kwargs: dict, num_threads: Optional[int],
                 visible_gpus: Optional[str], commands, events) -> None:
    """Process entry point (torch.multiprocessing spawn). visible_gpus: this replica's
    GPUs (CUDA_VISIBLE_DEVICES, set before CUDA starts here); None on the CPU."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if visible_gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
    import torch
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        from fastllm.llm import LLM
        llm = LLM(**llm_kwargs)
    except BaseException as e:              # a bad model path is the user's, not a crash
        events.send(("startup_error", picklable_error(e)))
        return
    engine = llm.llm_engine
    try:
        events.send(("ready", ReplicaInfo(index, os.getpid(), str(engine.device), visible_gpus,
                                          engine.config,
                                          engine.model_config, _stats(engine, 0))))
        ReplicaLoop(engine, commands, events).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("replica %d: the front end went away; stopping", index)
    finally:
        llm.close()


def _stats(engine, num_new_finished: int):
    """EngineStats with only the latency records of requests finished since the last
    report (the front end keeps the history), so a report stays small."""
    stats = engine.get_stats()
    recent = stats.requests[-num_new_finished:] if num_new_finished else []
    return replace(stats, requests=recent)


class ReplicaLoop:
    def __init__(self, engine, commands, events):
        self.engine, self.commands, self.events = engine, commands, events
        self.live: set[str] = set()            # requests added and not yet finished
        self.finished_since_stats = 0
        self.last_stats = 0.0
        self.stats_dirty = False

    def run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            if not busy and not self.commands.poll(1.0):
                continue                       # idle: wait for work (EOF ends the wait too)
            if not self._apply(self._take_commands()):
                return
            if self.engine.has_unfinished_requests():
                self._step()
            elif self.stats_dirty:             # went idle by aborts: report the empty queues
                self._send_outputs([], force_stats=True)

    def _take_commands(self) -> list:
        commands = []
        while self.commands.poll(0):
            commands.append(self.commands.recv())
        return commands

    def _apply(self, commands: list) -> bool:
        """Run the adds and aborts in order; False on a stop command."""
        accepted = []
        for cmd in commands:
            kind = cmd[0]
            if kind == "stop":
                return False
            if kind == "abort":
                ids = [rid for rid in cmd[1] if rid in self.live]
                self.engine.abort_request(ids)
                self.live.difference_update(ids)
                self.stats_dirty = True
                continue
            _, seq, rid, text, ids, params, delta, arrival = cmd
            try:
                self.engine.add_request(rid, text, params, prompt_token_ids=ids,
                                        arrival_time=arrival, delta=delta)
            except Exception as e:             # ValueError: the front end answers 400
                accepted.append((seq, rid, picklable_error(e)))
            else:
                self.live.add(rid)
                accepted.append((seq, rid, None))
        if accepted:
            self.events.send(("accepted", accepted))
        return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # LLMEngine.step dropped the failed step's requests; the others go on.
            failed = sorted(self.live - self.engine.get_unfinished_request_ids())
            self.live.difference_update(failed)
            logger.error("replica step failed (%r); failing requests %s", e, failed)
            self.events.send(("step_failed", failed, f"{type(e).__name__}: {e}"))
            return
        for out in outputs:
            if out.finished:
                self.live.discard(out.request_id)
                self.finished_since_stats += 1
        self.stats_dirty = True
        self._send_outputs(outputs, force_stats=not self.live)

    def _send_outputs(self, outputs: list, force_stats: bool) -> None:
        now = time.monotonic()
        stats = None
        if force_stats or now - self.last_stats >= STATS_INTERVAL_S:
            stats = _stats(self.engine, self.finished_since_stats)
            self.finished_since_stats, self.last_stats, self.stats_dirty = 0, now, False
        if outputs or stats is not None:
            self.events.send(("outputs", outputs, stats))
