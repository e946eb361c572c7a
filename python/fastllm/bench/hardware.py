"""`python -m fastllm.bench hardware`: what the hardware can do, before any engine runs.

- GEMM: TFLOP/s = 2*M*N*K / median time (one multiply-add = 2 FLOPs), per shape and dtype.
- copy: GB/s = 2*bytes / median time of dst.copy_(src) (every byte is read once, written once).
- P2P: GB/s = bytes / median time of a copy GPU i -> GPU j, "direct" when
  can_device_access_peer(i, j) (NVLink or PCIe P2P), else staged through pinned host memory.
- all_reduce: N processes (NCCL on GPUs, gloo on CPU so it runs anywhere), each size
  through torch.distributed and through fastllm's own Communicator side by side;
  algbw = bytes / time, busbw = algbw * 2*(N-1)/N (nccl-tests' bus bandwidth: what each
  link carries in a ring all_reduce, comparable across N). On one GPU: the time per call
  of a 1-rank NCCL all_reduce (both APIs), the floor under any multi-GPU figure.

Every result is a dict {bench, label, value, unit, formula, ...}; `--json OUT` writes them.
Defaults are small on CPU (seconds) and sized for a datacenter GPU otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import torch

from fastllm.bench.runner import median, progress, sync, time_op, write_json
from fastllm.utils import check_positive_int

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

CPU_DEFAULTS = dict(gemm_shapes=[(256, 256, 256), (512, 512, 512)], dtypes=["float32", "bfloat16"],
                    copy_sizes=[16 << 20], allreduce_sizes=[4 << 10, 256 << 10, 4 << 20],
                    warmup=2, iters=5)
# 8192 x 14336 x 4096: Llama-3-8B's MLP up-projection over a full 8192-token step.
GPU_DEFAULTS = dict(gemm_shapes=[(4096, 4096, 4096), (8192, 8192, 8192), (8192, 14336, 4096)],
                    dtypes=["bfloat16", "float16", "float32"], copy_sizes=[256 << 20, 1 << 30],
                    p2p_size=256 << 20, allreduce_sizes=[1 << 20, 16 << 20, 256 << 20, 1 << 30],
                    warmup=5, iters=20)

GEMM_FORMULA = "2*M*N*K / median_time"
COPY_FORMULA = "2*bytes (read+write) / median_time"
P2P_FORMULA = "bytes / median_time"
BUSBW_FORMULA = "algbw * 2*(n-1)/n, algbw = bytes / time (slowest rank)"


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOPs of C[M,N] = A[M,K] @ B[K,N]: M*N dot products of length K, each K multiply-adds."""
    for name, v in (("M", m), ("N", n), ("K", k)):
        check_positive_int(f"GEMM {name}", v)
    return 2 * m * n * k


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all_reduce bus bandwidth: a ring moves 2*(n-1)/n of the buffer per rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return algbw * 2 * (world_size - 1) / world_size


# -- GEMM and copy ---------------------------------------------------------------------------

def bench_gemm(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
               warmup: int, iters: int) -> dict:
    flops = gemm_flops(m, n, k)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen, device=device, dtype=dtype)
    times, c = time_op(lambda: a @ b, device, warmup, iters)
    # Check one output element against float64: a speed is only reported for a real product.
    expected = float(a[0].double() @ b[:, 0].double())
    got = float(c[0, 0])
    tol = (0.05 if dtype != torch.float32 else 0.01) * math.sqrt(k)
    t = median(times)
    return {"bench": "gemm", "label": f"gemm {m}x{n}x{k} {_dtype_name(dtype)}",
            "m": m, "n": n, "k": k, "dtype": _dtype_name(dtype), "flops": flops,
            "median_s": t, "value": flops / t / 1e12, "unit": "TFLOP/s", "formula": GEMM_FORMULA,
            "check_ok": abs(got - expected) <= tol}


def bench_copy(nbytes: int, device: torch.device, warmup: int, iters: int) -> dict:
    numel = max(1, nbytes // 4)
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    times, out = time_op(lambda: dst.copy_(src), device, warmup, iters)
    t = median(times)
    moved = 2 * numel * 4
    return {"bench": "copy", "label": f"copy {_size(numel * 4)} {torch.device(device).type}",
            "bytes": numel * 4, "median_s": t, "value": moved / t / 1e9, "unit": "GB/s",
            "formula": COPY_FORMULA, "check_ok": bool(torch.equal(out[-8:], src[-8:]))}


def bench_p2p(src_dev: int, dst_dev: int, nbytes: int, warmup: int, iters: int) -> dict:
    direct = bool(torch.cuda.can_device_access_peer(src_dev, dst_dev))
    numel = max(1, nbytes // 4)
    src = torch.rand(numel, device=f"cuda:{src_dev}")
    dst = torch.empty(numel, device=f"cuda:{dst_dev}")
    if direct:
        def op():
            return dst.copy_(src)
    else:
        host = torch.empty(numel, pin_memory=True)

        def op():
            host.copy_(src)
            return dst.copy_(host)
    times = []
    for i in range(warmup + iters):
        sync(src.device)
        sync(dst.device)
        t0 = time.perf_counter()
        op()
        sync(src.device)
        sync(dst.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = median(times)
    path = "direct" if direct else "via host"
    return {"bench": "p2p", "label": f"p2p {src_dev}->{dst_dev} {path}", "src": src_dev,
            "dst": dst_dev, "path": path, "bytes": numel * 4, "median_s": t,
            "value": numel * 4 / t / 1e9, "unit": "GB/s", "formula": P2P_FORMULA,
            "check_ok": bool(torch.equal(dst[-8:].cpu(), src[-8:].cpu()))}


# -- all_reduce over processes -------------------------------------------------------------

def default_backend(world_size: int) -> str:
    import torch.distributed as dist
    if (torch.cuda.is_available() and torch.cuda.device_count() >= world_size
            and dist.is_nccl_available()):
        return "nccl"
    return "gloo"


ALLREDUCE_APIS = ("torch", "fastllm")


def bench_all_reduce(world_size: int, sizes: Sequence[int], backend: Optional[str] = None,
                     warmup: int = 2, iters: int = 5, timeout_s: float = 300.0,
                     apis: Sequence[str] = ALLREDUCE_APIS) -> list:
    """all_reduce(SUM) of float32 buffers of each size in bytes across world_size spawned
    processes, through each of `apis` on the same ranks and buffers: "torch"
    (torch.distributed) and "fastllm" (fastllm's own Communicator: NCCL through fastllm._C
    on GPUs, gloo on CPU). Each rank contributes rank+1, so every element must come back
    as n*(n+1)/2; `correct` says whether all ranks saw that. One row per (size, api)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException
    if world_size < 2:
        raise ValueError(f"all_reduce world_size must be >= 2, got {world_size}")
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 4 for s in sizes):
        raise ValueError(f"all_reduce sizes must be >= 4 bytes, got {sizes}")
    apis = list(apis)
    if not apis or set(apis) - set(ALLREDUCE_APIS):
        raise ValueError(f"all_reduce apis must be among {ALLREDUCE_APIS}, got {apis}")
    backend = backend or default_backend(world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend nccl needs {world_size} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="fastllm-allreduce-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_all_reduce_worker, nprocs=world_size, join=True,
                     args=(world_size, backend, sizes, apis, warmup, iters, init_file, tmp, timeout_s))
        except ProcessException as e:       # a worker raised, or died (signal, OOM kill)
            raise RuntimeError(f"all_reduce benchmark worker failed:\n{e}") from None
        per_rank = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.json"), encoding="utf-8") as f:
                per_rank.append(json.load(f))
    expected = world_size * (world_size + 1) / 2
    results = []
    for i in range(len(per_rank[0])):
        rows = [r[i] for r in per_rank]
        t = max(row["time_s"] for row in rows)      # a collective is as slow as its slowest rank
        row_bytes, api = rows[0]["bytes"], rows[0]["api"]
        algbw = row_bytes / t / 1e9
        correct = all(v == expected for row in rows for v in row["observed"])
        results.append({
            "bench": "all_reduce", "label": f"all_reduce {_size(row_bytes)} x{world_size} {backend} {api}",
            "backend": backend, "api": api, "world_size": world_size, "bytes": row_bytes, "time_s": t,
            "algbw_GBps": algbw, "value": bus_bandwidth(algbw, world_size), "unit": "GB/s",
            "formula": BUSBW_FORMULA, "expected": expected,
            "observed": [v for row in rows for v in row["observed"]],
            "correct": correct, "check_ok": correct,
        })
    return results


def _all_reduce_worker(rank, world_size, backend, sizes, apis, warmup, iters, init_file, out_dir,
                       timeout_s):
    import torch.distributed as dist
    from fastllm.distributed.communicator import new_communicator
    torch.set_num_threads(1)     # N processes share the host's cores
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Collective: every rank makes it, before any timing.
    comm = new_communicator(list(range(world_size)), device) if "fastllm" in apis else None
    all_reduce = {"torch": dist.all_reduce, "fastllm": comm.all_reduce if comm is not None else None}
    rows = []
    try:
        for nbytes in sizes:
            for api in apis:
                numel = max(1, nbytes // 4)
                time_s, observed = _time_all_reduce(all_reduce[api], numel, rank, device, warmup, iters)
                rows.append({"api": api, "bytes": numel * 4, "time_s": time_s, "observed": observed})
    finally:
        if comm is not None:
            comm.close()
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f)


def _time_all_reduce(all_reduce, numel, rank, device, warmup, iters) -> tuple:
    """(seconds per call, [first, last] element of one checked reduction)."""
    import torch.distributed as dist
    x = torch.full((numel,), float(rank + 1), device=device)
    all_reduce(x)
    sync(device)
    observed = [float(x[0]), float(x[-1])]
    x.zero_()      # timed reductions of zeros: no overflow, same data movement
    for _ in range(warmup):
        all_reduce(x)
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        all_reduce(x)
    sync(device)
    return (time.perf_counter() - t0) / iters, observed


LATENCY_FORMULA = "median GPU time per call (CUDA events), 1 rank"


def bench_all_reduce_one_gpu(sizes: Sequence[int], warmup: int = 5, iters: int = 20) -> list:
    """What a single GPU can say about all_reduce: the time of a 1-rank NCCL all_reduce per
    call (launch + NCCL's local copy: the floor under every multi-GPU figure), through
    torch.distributed and through fastllm's NcclCommunicator, side by side."""
    import torch.distributed as dist
    from fastllm.distributed.nccl import NcclCommunicator
    device = torch.device("cuda", torch.cuda.current_device())
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    comm = NcclCommunicator([dist.get_rank()], device)
    results = []
    try:
        for nbytes in [int(s) for s in sizes]:
            numel = max(1, nbytes // 4)
            x = torch.rand(numel, device=device)
            expected = x.clone()
            for api, fn in (("torch", dist.all_reduce), ("fastllm", comm.all_reduce)):
                times, _ = time_op(lambda: fn(x), device, warmup, iters)
                t = median(times)
                results.append({
                    "bench": "all_reduce_1gpu", "label": f"all_reduce {_size(numel * 4)} x1 nccl {api} latency",
                    "backend": "nccl", "api": api, "world_size": 1, "bytes": numel * 4, "time_s": t,
                    "value": t * 1e6, "unit": "us", "formula": LATENCY_FORMULA,
                    "check_ok": bool(torch.equal(x, expected))})   # a sum over one rank: x itself
    finally:
        comm.close()
        if owns_group:
            dist.destroy_process_group()
    return results


# -- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda[:N]")
    parser.add_argument("--gemm-shapes", help="comma-separated MxNxK (e.g. 4096x4096x4096,16x4096x4096)")
    parser.add_argument("--dtypes", help="comma-separated GEMM dtypes: float32, float16, bfloat16")
    parser.add_argument("--copy-sizes-mb", help="comma-separated copy buffer sizes in MiB")
    parser.add_argument("--p2p-size-mb", type=float, help="P2P copy size in MiB (GPU pairs only)")
    parser.add_argument("--world-size", type=int,
                        help="all_reduce processes (default: GPU count if >= 2, else 2 on CPU)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], help="all_reduce backend (default: "
                        "nccl when there are enough GPUs, else gloo)")
    parser.add_argument("--allreduce-sizes-kb", help="comma-separated all_reduce sizes in KiB")
    parser.add_argument("--warmup", type=int, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, help="timed runs (the median is reported)")
    parser.add_argument("--skip", default="", help="comma-separated: gemm, copy, p2p, allreduce")
    parser.add_argument("--json", metavar="OUT", help="write every result to this JSON file")


def run(args: argparse.Namespace) -> dict:
    from fastllm.model.loader import resolve_device
    device = resolve_device(args.device)
    d = dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
    shapes = _parse_shapes(args.gemm_shapes) if args.gemm_shapes else d["gemm_shapes"]
    dtypes = [_parse_dtype(s) for s in _split(args.dtypes)] if args.dtypes else \
        [_DTYPES[s] for s in d["dtypes"]]
    copy_sizes = [_mib(s, "--copy-sizes-mb") for s in _split(args.copy_sizes_mb)] \
        if args.copy_sizes_mb else d["copy_sizes"]
    p2p_size = int(_positive(args.p2p_size_mb, "--p2p-size-mb") * (1 << 20)) if args.p2p_size_mb is not None \
        else GPU_DEFAULTS["p2p_size"]
    ar_sizes = [int(_positive(s, "--allreduce-sizes-kb") * 1024) for s in _split(args.allreduce_sizes_kb)]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    iters = d["iters"] if args.iters is None else args.iters
    if warmup < 0 or iters < 1:
        raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {warmup}, {iters}")
    skip = set(_split(args.skip))
    unknown = skip - {"gemm", "copy", "p2p", "allreduce"}
    if unknown:
        raise ValueError(f"--skip: unknown benchmark(s) {sorted(unknown)}; use gemm, copy, p2p, allreduce")

    jobs = []
    if "gemm" not in skip:
        jobs += [(bench_gemm, (m, n, k, dt, device, warmup, iters)) for m, n, k in shapes for dt in dtypes]
    if "copy" not in skip:
        jobs += [(bench_copy, (size, device, warmup, iters)) for size in copy_sizes]
    if "p2p" not in skip and device.type == "cuda":
        count = torch.cuda.device_count()
        jobs += [(bench_p2p, (i, j, p2p_size, warmup, iters))
                 for i in range(count) for j in range(count) if i != j]
    results = []
    print(f"fastllm.bench hardware on {_describe(device)} (median of {iters} runs after {warmup} warm-up)")
    for fn, fn_args in progress(jobs, desc="hardware", unit="bench"):
        res = fn(*fn_args)
        results.append(res)
        print(format_result(res), flush=True)
    if "allreduce" not in skip and device.type == "cuda" and torch.cuda.device_count() == 1:
        one_gpu_sizes = ar_sizes or [8 << 10, 1 << 20, 64 << 20]   # 8 KiB: a decode step's all_reduce
        for res in bench_all_reduce_one_gpu(one_gpu_sizes, warmup, iters):
            results.append(res)
            print(format_result(res), flush=True)
    if "allreduce" not in skip:
        world = args.world_size or (torch.cuda.device_count() if torch.cuda.device_count() >= 2 else 2)
        backend = args.backend or default_backend(world)
        # gloo reduces in host memory: GPU-sized buffers would take minutes there.
        ar = GPU_DEFAULTS if backend == "nccl" else CPU_DEFAULTS
        ar_warmup = ar["warmup"] if args.warmup is None else args.warmup
        ar_iters = ar["iters"] if args.iters is None else args.iters
        for res in bench_all_reduce(world, ar_sizes or ar["allreduce_sizes"], backend, ar_warmup, ar_iters):
            results.append(res)
            print(format_result(res), flush=True)
    report = {"device": _describe(device), "torch": torch.__version__, "results": results}
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return report


def format_result(res: dict) -> str:
    flag = "" if res.get("check_ok", True) else "  WRONG RESULT: do not trust this figure"
    return f"{res['label']:<44} {res['value']:>10.3f} {res['unit']:<8} [{res['formula']}]{flag}"


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU ({torch.get_num_threads()} threads)"


def _split(text: Optional[str]) -> list:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _parse_shapes(text: str) -> list:
    shapes = []
    for item in _split(text):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--gemm-shapes: {item!r} is not MxNxK with positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"--dtypes: {name!r} is not one of float32, float16, bfloat16")
    return _DTYPES[name]


def _positive(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{flag}: sizes must be positive, got {text!r}")
    return value


def _mib(text: str, flag: str) -> int:
    return int(_positive(text, flag) * (1 << 20))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"
