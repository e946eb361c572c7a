"""`python -m fastllm.bench overhead`: the engine's host time per decode step.

A tiny random model (so the forward pass is small), `--batch` requests of `--input-len`
random tokens generating until `--steps` decode steps have been timed, FINAL_ONLY outputs,
greedy. Each timed step is one `LLMEngine.step()` call with every request decoding; the
model's own forward is timed inside it (a wrapper around `model.forward`), and

    host overhead = step() wall time - forward wall time

i.e. scheduling, input and sampling packing, the sampler, and the post-step update and
output processing. Median over the timed steps, per batch size, twice: in wall time, and
in the CPU time of the engine's thread (time.thread_time; torch runs on that one thread,
--threads 1), which other processes on a shared machine disturb less. With --repeat R
the whole measurement runs R times and the smallest median is kept (load spikes from
other processes only ever add time). CPU only: on a
GPU the forward is asynchronous and this subtraction would not mean the same thing.
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from fastllm.bench import models
from fastllm.bench.runner import write_json
from fastllm.config import EngineConfig
from fastllm.sampling_params import RequestOutputKind, SamplingParams
from fastllm.utils import cdiv


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--input-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="decode steps run before timing")
    parser.add_argument("--preset", default="tiny", choices=sorted(models.RANDOM_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=1, help="runs per batch size; the fastest is kept")
    parser.add_argument("--output-json", default=None)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class _ForwardTimer:
    """Wraps model.forward: adds each call's (wall, thread CPU) time to `spent`."""

    def __init__(self, model):
        self.spent = (0.0, 0.0)
        self._forward = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        start = _clocks()
        try:
            return self._forward(*args, **kwargs)
        finally:
            end = _clocks()
            self.spent = (self.spent[0] + end[0] - start[0], self.spent[1] + end[1] - start[1])


def measure(loaded, batch: int, input_len: int, steps: int, warmup: int, seed: int) -> dict:
    """Median host overhead (wall and thread CPU) and step time, in seconds, over
    `steps` all-decode steps."""
    max_len = input_len + warmup + steps + 8
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(batch * input_len, 256),
                       max_model_len=max_len, num_kv_blocks=batch * cdiv(max_len, 16) + 1,
                       seed=seed)
    engine = models.make_engine(loaded, cfg)
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 4, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(3, loaded.config.vocab_size)
                                    for _ in range(input_len)], params)
    while engine.get_stats().num_generation_tokens == 0:   # prefill (may take several steps)
        engine.step()
    for _ in range(warmup):
        engine.step()
    timer = _ForwardTimer(loaded.model)
    walls, cpus, totals = [], [], []
    try:
        for _ in range(steps):
            before, start = timer.spent, _clocks()
            engine.step()
            end, after = _clocks(), timer.spent
            totals.append(end[0] - start[0])
            walls.append(end[0] - start[0] - (after[0] - before[0]))
            cpus.append(end[1] - start[1] - (after[1] - before[1]))
    finally:
        del loaded.model.forward          # back to the class's forward
    engine.abort_request([str(i) for i in range(batch)])
    engine.close()
    return {"batch": batch, "host_overhead_s": statistics.median(walls),
            "host_overhead_cpu_s": statistics.median(cpus), "step_s": statistics.median(totals)}


def run(args) -> None:
    for name in ("input_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch):
        raise ValueError("--batch sizes must be >= 1")
    if args.threads < 1 or args.repeat < 1:
        raise ValueError("--threads and --repeat must be >= 1")
    torch.set_num_threads(args.threads)
    loaded = models.load(random_weights=args.preset, device="cpu", dtype="float32", seed=args.seed)
    results = []
    for batch in args.batch:
        runs = [measure(loaded, batch, args.input_len, args.steps, args.warmup, args.seed)
                for _ in range(args.repeat)]
        r = {key: min(run[key] for run in runs) if key != "batch" else batch for key in runs[0]}
        results.append(r)
        print(f"batch {batch:>4}: host overhead {r['host_overhead_cpu_s'] * 1e3:.3f} ms/step CPU, "
              f"{r['host_overhead_s'] * 1e3:.3f} ms wall (step {r['step_s'] * 1e3:.3f} ms wall)")
    if args.output_json:
        write_json(args.output_json, {"preset": args.preset, "results": results})
