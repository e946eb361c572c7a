"""fastllm.bench hardware on CPU: FLOP and bandwidth formulas, all_reduce over 2 gloo ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastllm.bench import hardware
from fastllm.bench.runner import time_op

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_gemm_flop_count_by_hand():
    # seeds/000: [2, 5, 7] @ [3, 11, 13]^T is 3 multiplies + 3 adds = 6 FLOPs (M=N=1, K=3).
    assert hardware.gemm_flops(1, 1, 3) == 6
    # C[2,3] = A[2,4] @ B[4,3]: 6 dot products of length 4 -> 24 multiply-adds.
    assert hardware.gemm_flops(2, 3, 4) == 48
    assert hardware.gemm_flops(4096, 4096, 4096) == 137_438_953_472
    with pytest.raises(ValueError, match="K"):
        hardware.gemm_flops(2, 3, 0)


def test_bench_gemm_reports_flops_over_median_time():
    res = hardware.bench_gemm(64, 32, 16, torch.float32, CPU, warmup=1, iters=3)
    assert res["flops"] == 2 * 64 * 32 * 16
    assert res["value"] == pytest.approx(res["flops"] / res["median_s"] / 1e12, rel=1e-12)
    assert res["unit"] == "TFLOP/s" and res["formula"] == "2*M*N*K / median_time"
    assert res["check_ok"] is True
    assert res["label"] == "gemm 64x32x16 float32"


def test_time_op_calls_warmup_plus_iters_and_returns_the_result():
    calls = []
    times, out = time_op(lambda: calls.append(1) or len(calls), CPU, warmup=2, iters=5)
    assert len(calls) == 7 and len(times) == 5 and out == 7
    assert all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="iters"):
        time_op(lambda: None, CPU, warmup=0, iters=0)


def test_bench_copy_counts_read_and_write():
    res = hardware.bench_copy(1 << 20, CPU, warmup=1, iters=3)
    assert res["bytes"] == 1 << 20
    assert res["value"] == pytest.approx(2 * (1 << 20) / res["median_s"] / 1e9, rel=1e-12)
    assert res["unit"] == "GB/s" and res["check_ok"] is True


def test_bus_bandwidth_formula():
    assert hardware.bus_bandwidth(10.0, 2) == 10.0     # 2*(2-1)/2 = 1
    assert hardware.bus_bandwidth(10.0, 4) == 15.0     # 2*3/4
    assert hardware.bus_bandwidth(10.0, 8) == 17.5     # 2*7/8
    assert hardware.bus_bandwidth(10.0, 1) == 0.0


def test_all_reduce_two_gloo_processes_through_torch_and_fastllm():
    sizes = [64, 64 << 10]
    results = hardware.bench_all_reduce(2, sizes, backend="gloo", warmup=1, iters=2)
    # Each size through torch.distributed, then fastllm's Communicator, on the same ranks.
    assert [(r["bytes"], r["api"]) for r in results] == [(s, api) for s in sizes for api in ("torch", "fastllm")]
    for r in results:
        # Ranks contribute 1 and 2: every element of every rank must read 3.
        assert r["expected"] == 3.0
        assert r["observed"] == [3.0] * 4     # first and last element on each of 2 ranks
        assert r["correct"] is True
        assert r["backend"] == "gloo" and r["world_size"] == 2
        assert r["label"] == f"all_reduce {hardware._size(r['bytes'])} x2 gloo {r['api']}"
        assert r["time_s"] > 0
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["value"] == pytest.approx(r["algbw_GBps"])   # busbw = algbw * 2*(2-1)/2
        assert r["unit"] == "GB/s"
    with pytest.raises(ValueError, match="apis must be among"):
        hardware.bench_all_reduce(2, sizes, backend="gloo", apis=["mpi"])


def test_all_reduce_rejects_a_single_process():
    with pytest.raises(ValueError, match="world_size"):
        hardware.bench_all_reduce(1, [1024])


def _bench(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    return subprocess.run([sys.executable, "-m", "fastllm.bench", "hardware", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_hardware_cli_writes_json(tmp_path):
    out = tmp_path / "hw.json"
    proc = _bench("--device", "cpu", "--gemm-shapes", "32x16x8,8x8x8", "--dtypes", "float32",
                  "--copy-sizes-mb", "0.5", "--skip", "allreduce", "--warmup", "0", "--iters", "2",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["gemm 32x16x8 float32", "gemm 8x8x8 float32", "copy 512 KiB cpu"]
    for r in report["results"]:
        assert {"value", "unit", "formula"} <= set(r)
        assert f"{r['unit']}" in proc.stdout and r["formula"] in proc.stdout


def test_hardware_cli_bad_shape_is_a_clear_error(capsys):
    from fastllm.bench.__main__ import main
    assert main(["hardware", "--device", "cpu", "--gemm-shapes", "32x16", "--skip", "copy,allreduce"]) == 2
    err = capsys.readouterr().err
    assert "--gemm-shapes" in err and "'32x16' is not MxNxK" in err


def test_hardware_cli_bad_device_is_a_clear_error(capsys, monkeypatch):
    # The device rule is the loader's (one resolve_device for engine, bench and CLI).
    from fastllm.bench.__main__ import main
    assert main(["hardware", "--device", "gpu", "--skip", "gemm,copy,allreduce"]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["hardware", "--device", "cuda", "--skip", "gemm,copy,allreduce"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_one_gpu_all_reduce_latency_through_torch_and_fastllm():
    results = hardware.bench_all_reduce_one_gpu([8 << 10, 1 << 20], warmup=1, iters=3)
    assert [(r["bytes"], r["api"]) for r in results] == [(8 << 10, "torch"), (8 << 10, "fastllm"),
                                                        (1 << 20, "torch"), (1 << 20, "fastllm")]
    assert all(r["check_ok"] and r["value"] > 0 and r["unit"] == "us" for r in results)


@pytest.mark.cuda
def test_gemm_and_copy_on_gpu():
    dev = torch.device("cuda")
    res = hardware.bench_gemm(256, 256, 256, torch.bfloat16, dev, warmup=1, iters=3)
    assert res["check_ok"] and res["value"] > 0
    assert hardware.bench_copy(1 << 20, dev, warmup=1, iters=3)["check_ok"]


def test_all_reduce_worker_failure_is_reported():
    # An unknown backend makes every worker raise in init_process_group.
    with pytest.raises(RuntimeError, match="worker failed"):
        hardware.bench_all_reduce(2, [64], backend="no-such-backend", warmup=0, iters=1, timeout_s=20)
