"""Benchmarks and tuning tools: `python -m fastllm.bench <subcommand> --help`.

    hardware   GEMM TFLOP/s, copy / P2P bandwidth, all_reduce bus bandwidth
    sweep      engine throughput over a grid (concurrency, gpu_memory_utilization,
               max_num_seqs) -> JSON + PNG plots
    compare    ratio B/A of every numeric metric of two result JSON files

Each subcommand is a module here with add_arguments(parser) and run(args); register
new ones in fastllm.bench.__main__.SUBCOMMANDS.
"""
