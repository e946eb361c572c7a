"""`python -m fastllm.bench <subcommand> [options]`: dispatch to fastllm.bench.<module>.

Subcommand modules are imported only when chosen, so `compare` starts without torch.
Bad input (ValueError) ends with a one-line error and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "hardware": ("fastllm.bench.hardware", "GEMM, copy, P2P and all_reduce bandwidth"),
    "sweep": ("fastllm.bench.sweep", "engine throughput over a grid, JSON + PNG plots"),
    "compare": ("fastllm.bench.compare", "ratio B/A of each numeric metric of two JSON results"),
    "kernels": ("fastllm.bench.kernels", "each kernel vs copy/GEMM ceilings and torch peers"),
    "throughput": ("fastllm.bench.throughput", "fastllm vs transformers generate, tokens/s"),
    "latency": ("fastllm.bench.latency", "TTFT and inter-token latency p50/p99"),
    "overhead": ("fastllm.bench.overhead", "engine host time per decode step (CPU, tiny model)"),
    "serve": ("fastllm.bench.serve", "load-test an OpenAI-compatible server (--compare: vs transformers)"),
    "cpu": ("fastllm.bench.cpu", "CPU: fastllm vs transformers vs llama.cpp on one GGUF"),
    "spec": ("fastllm.bench.spec", "speculative decoding: speed-up and acceptance (ngram, draft)"),
    "pipeline": ("fastllm.bench.pipeline", "the pipeline bubble: PP=M (serial, microbatches) vs PP=1"),
    "structured": ("fastllm.bench.structured", "JSON-schema constrained vs free output tok/s, same requests"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "python -m fastllm.bench {" + ",".join(SUBCOMMANDS) + "} [options]"
    listing = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n\nsubcommands:\n{listing}")
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\nsubcommands:\n{listing}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m fastllm.bench {name}",
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        module.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
