"""`python -m fastllm.bench serve`: load-test any OpenAI-compatible server, as vLLM's
`bench serve` does.

    python -m fastllm.bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 4 --input-len 128 --output-len 64 --endpoint chat --json out.json

Every request streams (SSE) and is timed chunk by chunk; the report gives request and
token throughput, TTFT / TPOT / ITL / E2E mean, p50 and p99, and the errors. Requests
arrive as a Poisson process of --request-rate per second (inf: all at once), at most
--max-concurrency in flight. --ignore-eos forces every output to --output-len tokens on
servers that accept vLLM's `ignore_eos` field (fastllm, vLLM; not `transformers serve`).

    python -m fastllm.bench serve --compare [--checkpoint HF_DIR] ...

starts fastllm's server and `transformers serve` on the same checkpoint (default: the
default SmolLM2 model, converted once to a Hugging Face directory), both on CPU on
loopback ports, runs the same requests against each, and reports fastllm / transformers
for every number.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
from typing import Dict, Optional

from fastllm.bench.serve_load import ENDPOINTS, Target, first_model, random_requests, run_load
from fastllm.bench.serve_stats import format_report, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="server root; /v1/completions or /v1/chat/completions is added")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrivals per second; inf sends all at once (default)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--input-len", type=int, default=128, help="prompt length in words (~tokens)")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts, lengths and arrivals")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos=true so outputs run to max_tokens (vLLM field)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    compare = parser.add_argument_group("--compare: fastllm serve vs transformers serve")
    compare.add_argument("--compare", action="store_true",
                         help="start both servers on CPU and report fastllm / transformers")
    compare.add_argument("--checkpoint", default=None,
                         help="Hugging Face directory both serve (default: SmolLM2 converted)")
    compare.add_argument("--transformers-flags", default="",
                         help="extra `transformers serve` flags, e.g. '--continuous-batching'")
    compare.add_argument("--fastllm-flags", default="", help="extra `fastllm.serve` flags")
    compare.add_argument("--server-timeout", type=float, default=300.0,
                         help="seconds to wait for each server to come up")


def bench_url(args: argparse.Namespace, base_url: str, model: Optional[str] = None,
              ignore_eos: Optional[bool] = None) -> Dict[str, object]:
    """Run the configured load against one server; returns the summary (with its config)."""
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    requests = random_requests(args.num_prompts, args.input_len, args.output_len,
                               args.range_ratio, args.seed)
    model = model or args.model or asyncio.run(first_model(base_url, args.api_key))
    target = Target(base_url=base_url, model=model, endpoint=args.endpoint,
                    temperature=args.temperature,
                    ignore_eos=args.ignore_eos if ignore_eos is None else ignore_eos,
                    api_key=args.api_key)
    records = asyncio.run(run_load(target, requests, args.request_rate, args.max_concurrency,
                                   args.seed, args.timeout))
    summary = summarize(records)
    summary["config"] = {"base_url": base_url, "model": model, "endpoint": args.endpoint,
                         "num_prompts": args.num_prompts, "request_rate": str(args.request_rate),
                         "max_concurrency": args.max_concurrency, "input_len": args.input_len,
                         "output_len": args.output_len, "range_ratio": args.range_ratio,
                         "seed": args.seed, "temperature": args.temperature,
                         "ignore_eos": target.ignore_eos}
    return summary


def ratios(a: Dict[str, object], b: Dict[str, object], prefix: str = "") -> Dict[str, float]:
    """a / b for every numeric field both have (nested dicts flattened with dots)."""
    out: Dict[str, float] = {}
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            out.update(ratios(value, other, f"{prefix}{key}."))
        elif (isinstance(value, (int, float)) and isinstance(other, (int, float))
              and not isinstance(value, bool) and other):
            out[prefix + key] = value / other
    return out


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def run(args: argparse.Namespace) -> None:
    if args.compare:
        from fastllm.bench.serve_compare import compare_servers
        result = compare_servers(args)
    else:
        result = bench_url(args, args.base_url.rstrip("/"))
        print(format_report(result))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")

