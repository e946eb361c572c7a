"""`python -m fastllm.bench sweep`: engine throughput over a grid, as JSON + PNG plots.

Three sweeps (pick with --sweeps; all by default), each request a random-token prompt of
--input-len tokens generating exactly --output-len tokens (greedy, ignore_eos):

- batching: N requests submitted at once for each N in --concurrency, one engine with
  max_num_seqs = max(N). Throughput that keeps growing with N means the step is still
  memory-bound (weights are re-read per step, so more rows per step are nearly free);
  where it stops growing (gain < --saturation-gain per grid step) the GPU is
  compute-bound: the saturation point, marked on the plot.
- memory: one engine per --gpu-memory-utilization value (sizes the KV cache on a GPU;
  on a CPU it has no effect), --num-prompts requests each.
- max-num-seqs: one engine per --max-num-seqs value, --num-prompts requests each.

Every point records throughput, KV blocks (total and peak in use), preemptions and the
KV-cache efficiency at its fullest step (fastllm.engine.stats.KVPeakTracker). A point that runs out
of memory, or whose configuration the engine refuses (a ValueError such as a KV cache
too small for one request), is recorded with its error instead of ending the sweep.
Output: OUT/sweep.json and OUT/<sweep>.png.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from fastllm.bench import models
from fastllm.bench.runner import is_oom, progress, write_json
from fastllm.bench.throughput import run_batch
from fastllm.config import EngineConfig
from fastllm.engine.stats import KVPeakTracker, format_kv_report
from fastllm.profiling import maybe_profile, nvtx_range

SWEEPS = ("batching", "memory", "max-num-seqs")

CPU_DEFAULTS = dict(concurrency=[1, 2, 4, 8], gpu_memory_utilization=[0.7, 0.9],
                    max_num_seqs=[2, 4, 8], num_prompts=8, input_len=16, output_len=8)
# seeds/000: 512, 1024, ... until throughput saturates; seeds/003: 0.7-0.95 and 64-1024.
GPU_DEFAULTS = dict(concurrency=[64, 128, 256, 512, 1024, 2048],
                    gpu_memory_utilization=[0.7, 0.8, 0.9, 0.95],
                    max_num_seqs=[64, 128, 256, 512, 1024], num_prompts=1024,
                    input_len=128, output_len=128)


def find_saturation(xs: Sequence[float], throughputs: Sequence[float],
                    min_gain: float = 0.10) -> dict:
    """Where throughput stops growing: the first x that no later grid point beats by
    `min_gain` (relative) or more, so one noisy dip does not end the growth early.
    -> {saturation_x, bound, note}; saturation_x is None when the last point still gains
    (memory-bound there: more concurrency would still raise throughput)."""
    if len(xs) != len(throughputs):
        raise ValueError(f"xs ({len(xs)}) and throughputs ({len(throughputs)}) differ in length")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not xs:
        return {"saturation_x": None, "bound": None, "note": "no successful points"}
    for i in range(len(xs) - 1):
        later = max(throughputs[i + 1:])
        if later < throughputs[i] * (1 + min_gain):
            gain = (later / throughputs[i] - 1) * 100 if throughputs[i] else 0.0
            return {"saturation_x": xs[i], "bound": "compute",
                    "note": f"throughput stops growing at {xs[i]} (best later point {gain:+.1f}%)"}
    return {"saturation_x": None, "bound": "memory",
            "note": f"throughput still grows at {xs[-1]}: not saturated, try larger values"}


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list:
    """Distinct random token-id prompts (no shared prefix, so no prefix-cache hits)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, length), generator=gen).tolist()


def run_requests(engine, prompts: list, output_len: int, tag: str) -> dict:
    """Submit every prompt at once, step the engine until all finish (throughput.run_batch),
    and measure. The KV report is the one of the step with the most blocks in use."""
    stats0 = engine.get_stats()
    kv = KVPeakTracker(engine)
    bar = progress(None, desc=tag, total=len(prompts), unit="req")
    outputs, elapsed = run_batch(engine, prompts, [output_len] * len(prompts), tag,
                                 after_step=kv.observe, on_finished=lambda _: bar.update(1))
    elapsed -= kv.overhead_s                                # engine time only
    bar.close()
    finished = len(outputs)
    output_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    ttfts = [out.metrics.first_token_time - out.metrics.arrival_time for out in outputs
             if out.metrics is not None and out.metrics.first_token_time is not None]
    stats = engine.get_stats()
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "status": "ok",
        "num_requests": len(prompts),
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "throughput_tok_s": output_tokens / elapsed,
        "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "requests_per_s": finished / elapsed,
        "mean_ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "kv_blocks_total": stats.kv_blocks_total,
        "kv_blocks_peak": kv.peak_blocks,
        "kv_peak_usage": kv.peak_blocks / stats.kv_blocks_total,
        "preemptions": stats.num_preemptions - stats0.num_preemptions,
        "steps": stats.num_steps - stats0.num_steps,
        "kv": kv.report(),
    }


def _point(loaded, engine_config: EngineConfig, prompts: list, output_len: int, tag: str,
           engine=None) -> dict:
    """One grid point; a memory or configuration failure becomes the point's result."""
    own = engine is None
    try:
        with nvtx_range(f"sweep {tag}"):
            if own:
                engine = models.make_engine(loaded, engine_config)
                run_requests(engine, prompts[:1], 2, f"{tag}-warmup")
            return run_requests(engine, prompts, output_len, tag)
    except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised
        if is_oom(e):
            status = "oom"
        elif isinstance(e, ValueError):
            status = "rejected"
        else:
            raise
        if engine is not None:      # drop the half-run requests so the engine can be reused
            for rid in list(engine.scheduler.groups):
                engine.abort_request(rid)
        return {"status": status, "error": f"{type(e).__name__}: {e}"}
    finally:
        if own:
            engine = None
            models.release(loaded.device)


def sweep_batching(loaded, base: dict, concurrency: list, input_len: int, output_len: int,
                   seed: int, min_gain: float) -> dict:
    cfg = EngineConfig(**{**base, "max_num_seqs": max(concurrency)})
    points = []
    engine = None
    try:
        engine = models.make_engine(loaded, cfg)
        run_requests(engine, random_prompts(1, input_len, loaded.config.vocab_size, seed), 2, "warmup")
    except Exception as e:  # noqa: BLE001
        if not (is_oom(e) or isinstance(e, ValueError)):
            raise
        failure = {"status": "oom" if is_oom(e) else "rejected", "error": f"{type(e).__name__}: {e}"}
        points = [{"concurrency": c, **failure} for c in concurrency]
        engine = None
    if engine is not None:
        for c in progress(concurrency, desc="batching sweep", unit="point"):
            prompts = random_prompts(c, input_len, loaded.config.vocab_size, seed + c)
            res = _point(loaded, cfg, prompts, output_len, f"batching c={c}", engine=engine)
            points.append({"concurrency": c, **res})
            _print_point("batching", f"concurrency {c}", points[-1])
            engine.reset_prefix_cache()
    engine = None
    models.release(loaded.device)
    ok = [p for p in points if p["status"] == "ok"]
    sat = find_saturation([p["concurrency"] for p in ok], [p["throughput_tok_s"] for p in ok], min_gain)
    print(f"  batching: {sat['note']} ({sat['bound'] or 'n/a'}-bound)")
    return {"x": "concurrency", "max_num_seqs": max(concurrency), "points": points, **sat}


def sweep_engine_param(loaded, base: dict, name: str, values: list, prompts: list,
                       output_len: int) -> dict:
    points = []
    for v in progress(values, desc=f"{name} sweep", unit="point"):
        try:
            cfg = EngineConfig(**{**base, name: v})
        except ValueError as e:
            res = {"status": "rejected", "error": f"ValueError: {e}"}
        else:
            res = _point(loaded, cfg, prompts, output_len, f"{name}={v}")
        points.append({name: v, **res})
        _print_point(name, f"{name} {v}", points[-1])
    ok = [p for p in points if p["status"] == "ok"]
    best = max(ok, key=lambda p: p["throughput_tok_s"]) if ok else None
    return {"x": name, "points": points, "best": None if best is None else best[name]}


def _print_point(sweep: str, what: str, p: dict) -> None:
    if p["status"] != "ok":
        print(f"  {sweep}: {what}: {p['status'].upper()} ({p['error']})", flush=True)
        return
    print(f"  {sweep}: {what}: {p['throughput_tok_s']:.1f} output tok/s, {p['requests_per_s']:.2f} req/s, "
          f"KV blocks {p['kv_blocks_peak']}/{p['kv_blocks_total']}, preemptions {p['preemptions']}",
          flush=True)


# -- plots ---------------------------------------------------------------------------------

def plot_sweep(result: dict, path: str, title: str) -> str:
    """Throughput (left axis) and KV blocks / preemptions (right axis) against the swept
    value; failed points as red crosses on the x axis; the saturation point marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x_key = result["x"]
    points = result["points"]
    ok = [p for p in points if p["status"] == "ok"]
    bad = [p for p in points if p["status"] != "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[x_key] for p in ok], [p["throughput_tok_s"] for p in ok], "o-", color="tab:blue",
            label="output tok/s")
    if bad:
        ax.plot([p[x_key] for p in bad], [0] * len(bad), "x", color="red", markersize=10,
                label="OOM / rejected")
    if result.get("saturation_x") is not None:
        ax.axvline(result["saturation_x"], color="tab:green", linestyle="--",
                   label=f"saturation at {result['saturation_x']}")
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel("throughput (output tokens/s)")
    if x_key in ("concurrency", "max_num_seqs") and len(points) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[x_key] for p in points], [str(p[x_key]) for p in points])
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    right.plot([p[x_key] for p in ok], [p["kv_blocks_peak"] for p in ok], "s:", color="tab:orange",
               label="peak KV blocks")
    right.plot([p[x_key] for p in ok], [p["preemptions"] for p in ok], "^:", color="tab:purple",
               label="preemptions")
    right.set_ylabel("KV blocks / preemptions")
    handles = ax.get_legend_handles_labels()
    handles2 = right.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory or .gguf file")
    src.add_argument("--random-weights", nargs="?", const="tiny", metavar="PRESET",
                     help=f"random weights of a preset shape ({', '.join(models.RANDOM_PRESETS)}; "
                          "default tiny, for CPU)")
    parser.add_argument("--out", default="sweep_results", help="output directory (JSON + PNG)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {SWEEPS}")
    parser.add_argument("--concurrency", help="comma-separated request counts (batching sweep)")
    parser.add_argument("--gpu-memory-utilization", help="comma-separated fractions (memory sweep)")
    parser.add_argument("--max-num-seqs", help="comma-separated caps (max-num-seqs sweep)")
    parser.add_argument("--num-prompts", type=int, help="requests per point of the memory and max-num-seqs sweeps")
    parser.add_argument("--input-len", type=int, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, help="generated tokens per request")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, help="fixed KV cache size (overrides memory sizing)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step eagerly (no CUDA graphs for decode steps)")
    parser.add_argument("--gpu-memory-utilization-base", type=float, default=0.9,
                        help="gpu_memory_utilization of the batching and max-num-seqs sweeps")
    parser.add_argument("--saturation-gain", type=float, default=0.10,
                        help="relative throughput gain per grid step below which it is saturated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", action="store_true", help="print the KV-cache report of every point")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of the sweep to DIR")


def run(args: argparse.Namespace) -> dict:
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    unknown = set(sweeps) - set(SWEEPS)
    if unknown or not sweeps:
        raise ValueError(f"--sweeps: unknown {sorted(unknown)}; choose from {', '.join(SWEEPS)}")
    loaded = models.load(args.model, args.random_weights, args.device, args.dtype, args.seed)
    d = GPU_DEFAULTS if loaded.device.type == "cuda" else CPU_DEFAULTS
    concurrency = _ints(args.concurrency, "--concurrency") or d["concurrency"]
    utils = _floats(args.gpu_memory_utilization, "--gpu-memory-utilization") or d["gpu_memory_utilization"]
    max_seqs = _ints(args.max_num_seqs, "--max-num-seqs") or d["max_num_seqs"]
    num_prompts = _positive(args.num_prompts, "--num-prompts") or d["num_prompts"]
    input_len = _positive(args.input_len, "--input-len") or d["input_len"]
    output_len = _positive(args.output_len, "--output-len") or d["output_len"]
    base = dict(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization_base,
                max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                enforce_eager=args.enforce_eager, seed=args.seed)
    EngineConfig(**base)          # bad base flags fail here, before any point runs
    os.makedirs(args.out, exist_ok=True)
    print(f"fastllm.bench sweep: {loaded.name} on {loaded.device} ({str(loaded.dtype).replace('torch.', '')}), "
          f"{input_len} in / {output_len} out tokens per request")
    if loaded.device.type != "cuda" and "memory" in sweeps:
        print("  note: gpu_memory_utilization sizes the KV cache only on a GPU; on CPU the memory "
              "sweep repeats one cache size")
    report = {"model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype),
              "input_len": input_len, "output_len": output_len, "engine": base, "sweeps": {}}
    prompts = random_prompts(num_prompts, input_len, loaded.config.vocab_size, args.seed)
    with maybe_profile(args.profile):
        if "batching" in sweeps:
            report["sweeps"]["batching"] = sweep_batching(loaded, base, concurrency, input_len,
                                                          output_len, args.seed, args.saturation_gain)
        if "memory" in sweeps:
            report["sweeps"]["memory"] = sweep_engine_param(loaded, base, "gpu_memory_utilization",
                                                            utils, prompts, output_len)
        if "max-num-seqs" in sweeps:
            report["sweeps"]["max-num-seqs"] = sweep_engine_param(loaded, base, "max_num_seqs",
                                                                  max_seqs, prompts, output_len)
    titles = {"batching": "throughput vs concurrent requests",
              "memory": "throughput vs gpu_memory_utilization",
              "max-num-seqs": "throughput vs max_num_seqs"}
    plots = {}
    for name, result in report["sweeps"].items():
        plots[name] = plot_sweep(result, os.path.join(args.out, f"{name}.png"),
                                 f"{titles[name]} ({loaded.name})")
        if args.stats:
            for p in result["points"]:
                if p["status"] == "ok" and p["kv"] is not None:
                    print(f"[{name} {result['x']}={p[result['x']]}]\n{format_kv_report(p['kv'])}")
    report["plots"] = plots
    path = write_json(os.path.join(args.out, "sweep.json"), report)
    print(f"wrote {path} and {', '.join(plots.values())}")
    if args.profile:
        print(f"wrote a torch.profiler trace under {args.profile} (open in Perfetto or TensorBoard)")
    return report


def _split(text: Optional[str]) -> list:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _ints(text: Optional[str], flag: str) -> list:
    out = []
    for s in _split(text):
        if not s.isdigit() or int(s) <= 0:
            raise ValueError(f"{flag}: {s!r} is not a positive integer")
        out.append(int(s))
    return out


def _floats(text: Optional[str], flag: str) -> list:
    out = []
    for s in _split(text):
        try:
            out.append(float(s))
        except ValueError:
            raise ValueError(f"{flag}: {s!r} is not a number") from None
    return out


def _positive(value: Optional[int], flag: str) -> Optional[int]:
    if value is not None and value <= 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    return value
