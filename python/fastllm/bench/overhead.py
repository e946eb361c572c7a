"""`python -m fastllm.bench overhead`: the engine's host time per decode step.

A tiny random model (so the forward pass is small), `--batch` requests of `--input-len`
random tokens generating until `--steps` decode steps have been timed, FINAL_ONLY outputs,
greedy. Each timed step is one `LLMEngine.step()` call with every request decoding; the
model's own forward is timed inside it (a wrapper around `model.forward`), and

    host overhead = step() wall time - forward wall time

i.e. scheduling, input and sampling packing, the sampler, and the post-step update and
output processing. Median over the timed steps, per batch size. CPU only: on a GPU the
forward is asynchronous and this subtraction would not mean the same thing.
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
    parser.add_argument("--output-json", default=None)


class _ForwardTimer:
    """Wraps model.forward: adds each call's wall time to `seconds`."""

    def __init__(self, model):
        self.seconds = 0.0
        self._forward = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def measure(loaded, batch: int, input_len: int, steps: int, warmup: int, seed: int) -> dict:
    """Median host overhead and step time (seconds) over `steps` all-decode steps."""
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
    overheads, totals = [], []
    try:
        for _ in range(steps):
            before = timer.seconds
            t0 = time.perf_counter()
            engine.step()
            total = time.perf_counter() - t0
            totals.append(total)
            overheads.append(total - (timer.seconds - before))
    finally:
        del loaded.model.forward          # back to the class's forward
    engine.abort_request([str(i) for i in range(batch)])
    engine.close()
    return {"batch": batch, "host_overhead_s": statistics.median(overheads),
            "step_s": statistics.median(totals)}


def run(args) -> None:
    for name in ("input_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch):
        raise ValueError("--batch sizes must be >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = models.load(random_weights=args.preset, device="cpu", dtype="float32", seed=args.seed)
    results = []
    for batch in args.batch:
        r = measure(loaded, batch, args.input_len, args.steps, args.warmup, args.seed)
        results.append(r)
        print(f"batch {batch:>4}: host overhead {r['host_overhead_s'] * 1e3:.3f} ms/step "
              f"(step {r['step_s'] * 1e3:.3f} ms)")
    if args.output_json:
        write_json(args.output_json, {"preset": args.preset, "results": results})
