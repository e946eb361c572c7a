"""`python -m fastllm.bench latency`: time to first token and inter-token latency.

Two scenarios on one engine, greedy with ignore_eos, random-token prompts of --input-len
generating --output-len tokens each:

- batch1: --num-requests requests one after another, alone on the engine (the latency
  a single user sees; decode speed = 1 / inter-token latency).
- load: --num-load-requests requests with --concurrency of them in flight at all times
  (a closed loop: a new request is submitted as soon as one finishes), so every decode
  step is shared by up to K requests and prefills of newcomers interleave with them.

Clock: the benchmark times `LLMEngine.step()` itself. A request's submit time is taken
just before `add_request`; a token's time is when the step that sampled it returns
(step() reads the sampled ids back from the device, so the token exists by then).
  TTFT = first token time - submit time
  ITL  = gaps between consecutive token times of one request (all requests pooled)
p50/p99 are linearly interpolated percentiles (numpy's default method).
"""
from __future__ import annotations

import argparse
import collections
import math
import time
from typing import Sequence

import torch

from fastllm.bench import models
from fastllm.bench.runner import add_engine_arguments, device_defaults, engine_config_from_args, write_json
from fastllm.bench.throughput import add_model_arguments, load_model, make_requests
from fastllm.config import EngineConfig
from fastllm.sampling_params import SamplingParams


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(values: Sequence[float]) -> dict:
    return {"p50_s": percentile(values, 50), "p99_s": percentile(values, 99),
            "mean_s": sum(values) / len(values), "max_s": max(values), "count": len(values)}


def measure(engine, prompts: list, output_len: int, concurrency: int, tag: str) -> dict:
    """Run `prompts` keeping at most `concurrency` in flight; -> TTFT / ITL / end-to-end
    statistics and throughput (see the module docstring for the clock)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    queue = collections.deque(enumerate(prompts))
    submitted, finished = {}, {}
    token_times = collections.defaultdict(list)
    max_running = 0
    t0 = time.perf_counter()
    while queue or engine.has_unfinished_requests():
        while queue and len(submitted) - len(finished) < concurrency:
            i, prompt = queue.popleft()
            rid = f"{tag}-{i}"
            submitted[rid] = time.perf_counter()
            engine.add_request(rid, prompt, params, delta=True)
        max_running = max(max_running, len(submitted) - len(finished))
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            token_times[out.request_id].extend([now] * new_tokens)
            if out.finished:
                finished[out.request_id] = now
    elapsed = time.perf_counter() - t0

    ttft, itl, e2e = [], [], []
    for rid, start in submitted.items():
        times = token_times[rid]
        if len(times) != output_len:
            raise AssertionError(f"request {rid} produced {len(times)} tokens, expected {output_len}")
        ttft.append(times[0] - start)
        itl.extend(b - a for a, b in zip(times, times[1:]))
        e2e.append(finished[rid] - start)
    result = {"num_requests": len(prompts), "concurrency": concurrency,
              "max_in_flight": max_running, "elapsed_s": elapsed,
              "output_tok_s": len(prompts) * output_len / elapsed,
              "ttft": latency_stats(ttft), "e2e": latency_stats(e2e)}
    if itl:
        result["itl"] = latency_stats(itl)
        result["decode_tok_s_per_request"] = 1.0 / result["itl"]["mean_s"]
    return result


def decode_step_bytes(model: torch.nn.Module, config, dtype: torch.dtype) -> dict:
    """What one decode step must read, for the bandwidth bound of batch-1 decode:
    every weight once, except an untied input embedding table (the step gathers one row
    of it), plus each cached token's K and V rows in every layer (kv_bytes_per_token)."""
    total = embed = 0
    for name, param in model.named_parameters():   # a tied lm_head is counted once
        nbytes = param.numel() * param.element_size()
        total += nbytes
        if name.endswith("embed_tokens.weight") and not config.tie_word_embeddings:
            embed = nbytes
    elem = torch.tensor([], dtype=dtype).element_size()
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem
    return {"weight_bytes": total, "weight_bytes_read_per_step": total - embed,
            "kv_bytes_per_token": kv}


def run_latency(loaded, engine_config: EngineConfig, input_len: int, output_len: int,
                num_requests: int, concurrency: int, num_load_requests: int, seed: int = 0) -> dict:
    if output_len < 2:
        raise ValueError(f"--output-len must be >= 2 to have an inter-token latency, got {output_len}")
    vocab = loaded.config.vocab_size
    engine = models.make_engine(loaded, engine_config)
    warm, _ = make_requests(2, vocab, seed + 1, min(input_len, 8), 4)
    measure(engine, warm, 4, 2, "warmup")
    batch1, _ = make_requests(num_requests, vocab, seed, input_len, output_len)
    load, _ = make_requests(num_load_requests, vocab, seed + 2, input_len, output_len)
    scenarios = {"batch1": measure(engine, batch1, output_len, 1, "batch1"),
                 "load": measure(engine, load, output_len, concurrency, "load")}
    del engine
    models.release(loaded.device)
    return scenarios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (512 GPU, 16 CPU)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (128 GPU, 8 CPU)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="batch-1 requests, one at a time (10 GPU, 3 CPU)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight in the load scenario (32 GPU, 4 CPU)")
    parser.add_argument("--num-load-requests", type=int, default=None,
                        help="requests in the load scenario (4 x concurrency by default)")
    add_engine_arguments(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


def run(args: argparse.Namespace) -> dict:
    loaded, _ = load_model(args)
    pick = device_defaults(loaded.device.type == "cuda")

    concurrency = pick(args.concurrency, 32, 4)
    input_len, output_len = pick(args.input_len, 512, 16), pick(args.output_len, 128, 8)
    num_requests = pick(args.num_requests, 10, 3)
    num_load = args.num_load_requests if args.num_load_requests is not None else 4 * concurrency
    for flag, v in (("--input-len", input_len), ("--num-requests", num_requests),
                    ("--num-load-requests", num_load)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    engine_config = engine_config_from_args(args)
    scenarios = run_latency(loaded, engine_config, input_len, output_len, num_requests,
                            concurrency, num_load, args.seed)
    result = {"bench": "latency", "model": loaded.name,
              "device": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu",
              "dtype": str(loaded.dtype).replace("torch.", ""), "torch": torch.__version__,
              "input_len": input_len, "output_len": output_len,
              "decode_bytes": decode_step_bytes(loaded.model, loaded.config, loaded.dtype),
              "scenarios": scenarios}
    print(format_results(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def format_results(result: dict) -> str:
    def ms(x):
        return f"{x * 1e3:.2f} ms"
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}): "
             f"{result['input_len']} in / {result['output_len']} out"]
    for name, s in result["scenarios"].items():
        itl = s.get("itl")
        lines.append(f"  {name:<7} x{s['concurrency']:<4} TTFT p50 {ms(s['ttft']['p50_s'])} "
                     f"p99 {ms(s['ttft']['p99_s'])}; ITL p50 {ms(itl['p50_s'])} p99 {ms(itl['p99_s'])}; "
                     f"{s['output_tok_s']:.1f} tok/s total")
    return "\n".join(lines)
