"""The engine's command-line arguments, shared by `fastllm.generate` and `fastllm.serve`.

    add_engine_args(parser)            # --model, --dtype, --device, --seed and the engine group
    llm = LLM(**llm_kwargs(args))      # the same keywords LLM(...) takes
"""
from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser, *, model_help: str = None) -> None:
    parser.add_argument("--model", default=None,
                        help=model_help or "HF model directory or .gguf file "
                                           "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g = parser.add_argument_group("engine")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--swap-space", type=float, default=0, help="GiB of CPU memory for preempted KV")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="the most logprobs (or top_logprobs) a request may ask for")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks each layer is split over (one process per GPU; spawned, or torchrun's)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="pipeline stages the layers are split into")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (no CUDA graphs for decode steps)")
    g.add_argument("--data-parallel-size", type=int, default=1,
                   help="engine replicas, one process each (cuda:i on GPUs); requests go to "
                        "the least loaded")


def llm_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the flags add_engine_args defined."""
    return dict(model=args.model, dtype=args.dtype, device=args.device,
                block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching,
                enable_chunked_prefill=not args.no_chunked_prefill,
                swap_space=args.swap_space, enforce_eager=args.enforce_eager, seed=args.seed,
                max_logprobs=args.max_logprobs, tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                data_parallel_size=args.data_parallel_size)
