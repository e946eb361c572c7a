"""scripts/gpu_check.sh --dry-run, as CI runs it, so the one prepared GPU run cannot rot
between GPU sessions: every phase runs (the GPU parts skipped, each bench at a tiny CPU
size), the summary JSON has the schema a GPU session reads, and the device tool's limits
on what comes back (8 files, 16 MiB each) hold. Plus the script's bounding (a phase killed
at its limit does not stop the next), its argument checks, and the summary's arithmetic
on hand-made inputs (scripts/gpu_summary.py)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PHASES = ["build", "cpptest", "pytest", "kernels", "latency", "throughput", "mixed"]
STATUSES = {"ok", "failed", "timeout", "skipped", "not_selected"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def load_summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check(out: Path, *args, timeout=600):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = gpu_check(out, "--dry-run")
    return proc, out


def test_dry_run_passes_and_stays_within_the_device_tools_limits(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"gpu_check.log", "summary.json"}
    assert len(files) <= 8 and all(p.stat().st_size <= 16 << 20 for p in files)
    log = (out / "gpu_check.log").read_text()
    for phase in PHASES:      # each phase's header and its status line, in the log
        assert f"=== {phase} (limit " in log and f"--- {phase}: " in log


def test_dry_run_summary_schema(dry_run):
    _, out = dry_run
    doc = json.loads((out / "summary.json").read_text())
    assert doc["schema"] == "fastllm-gpu-check/1" and doc["dry_run"] is True and doc["ok"] is True
    assert isinstance(doc["commit"], str) and doc["commit"]
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        assert doc["commit"].removesuffix("-dirty") == head and doc["commit_from"] == "git"
    assert doc["gpu"] is None                          # no nvidia-smi query on a dry run
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["cuda_available"] is False
    assert doc["build"]["native"] is True
    assert 0 < doc["wall_s"] <= doc["total_budget_s"]

    assert list(doc["phases"]) == PHASES
    for name, phase in doc["phases"].items():
        assert set(phase) == {"status", "rc", "duration_s", "limit_s", "budget_s", "reason"}
        assert phase["status"] in STATUSES
        assert 0 < phase["limit_s"] <= phase["budget_s"]
        assert 0 <= phase["duration_s"] <= phase["limit_s"] + 10
        if name == "cpptest" and phase["status"] == "skipped":   # no binary built on this machine
            assert "no C++ test binary" in phase["reason"]
        else:
            assert phase["status"] == "ok" and phase["rc"] == 0, (name, phase)


def test_dry_run_summary_holds_every_phases_figures(dry_run):
    _, out = dry_run
    results = json.loads((out / "summary.json").read_text())["results"]
    pytest_counts = results["pytest"]
    # Every cuda-marked test was collected and skipped for want of a GPU; none ran.
    assert pytest_counts["total"] > 100 and pytest_counts["skipped"] == pytest_counts["total"]
    assert pytest_counts["failed"] == pytest_counts["errors"] == pytest_counts["passed"] == 0
    assert pytest_counts["skip_reasons"]["needs a CUDA GPU"] > 100
    if results["cpptest"] is not None:
        assert results["cpptest"]["failed"] == 0 and results["cpptest"]["passed"] > 0

    kernels = results["kernels"]
    assert kernels["quick"] is True and kernels["small"] is True
    assert kernels["ceilings"]["copy_GBps"] > 0 and len(kernels["kernels"]) >= 4
    latency = results["latency"]
    assert latency["input_len"] == 8 and latency["output_len"] == 4
    assert latency["scenarios"]["batch1"]["itl"]["count"] == 2 * 3      # 2 requests x 3 gaps
    throughput = results["throughput"]
    assert throughput["partial"] is False
    assert throughput["engines"]["fastllm"]["output_tokens"] == 8 * 4
    assert throughput["engines"]["hf_static"]["output_tokens"] == 4 * 4   # the first 4 requests
    assert throughput["agreement"]["hf_static"]["identical_requests"] == 4    # float32: equal
    mixed = results["mixed"]
    assert mixed["random_lengths"] is True and mixed["num_prompts"] == 6

    targets = {t["name"]: t for t in json.loads((out / "summary.json").read_text())["targets"]}
    assert {"decode_step_vs_bandwidth_bound", "throughput_1000x256_req_s", "mixed_vs_hf_continuous",
            "bf16_first_16_tokens_vs_transformers"} <= set(targets)
    assert all(t["met"] is None for t in targets.values())      # CPU toys are judged by nobody
    assert targets["throughput_1000x256_req_s"]["value"] == throughput["engines"]["fastllm"]["requests_per_s"]
    assert targets["decode_step_vs_bandwidth_bound"]["value"] > 0


def test_a_phase_killed_at_its_limit_does_not_stop_the_next(tmp_path):
    # One second is not enough for `bench kernels` even to import torch: `timeout` kills it,
    # the phase is recorded as a timeout, latency still runs, and the run exits 1.
    proc = gpu_check(tmp_path, "--dry-run", "--no-build", "--phases", "kernels,latency",
                     "--budget", "kernels=1")
    assert proc.returncode == 1, proc.stdout[-2000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    phases = doc["phases"]
    assert phases["kernels"]["status"] == "timeout" and phases["kernels"]["rc"] in (124, 137)
    assert phases["kernels"]["limit_s"] == 1 and phases["kernels"]["duration_s"] < 15
    assert phases["latency"]["status"] == "ok"
    assert {phases[p]["status"] for p in ("build", "cpptest", "pytest", "throughput", "mixed")} == {"not_selected"}
    assert doc["ok"] is False and doc["results"]["kernels"] is None
    assert doc["results"]["latency"]["scenarios"]["batch1"]["num_requests"] == 2


@pytest.mark.parametrize("args, message", [
    (["--phases", "pytest,gpu"], "unknown phase 'gpu'"),
    (["--budget", "kernels=soon"], "expected PHASE=SECONDS"),
    (["--budget", "warp=10"], "unknown phase 'warp'"),
    (["--frobnicate"], "unknown argument"),
])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, args, message):
    proc = gpu_check(tmp_path, "--dry-run", *args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "summary.json").exists()


# -- scripts/gpu_summary.py on hand-made inputs ------------------------------------------------------

def test_decode_bound_target_by_hand():
    summary = load_summary_module()
    # 5 ms per token; 16 GB of weights + 131072 B/token x (512 + 128/2 = 576 tokens) of KV,
    # at 4000 GB/s: bound = (16e9 + 75497472) / 4e12 = 4.018874 ms -> 5 / 4.018874 = 1.24413.
    latency = {"input_len": 512, "output_len": 128,
               "decode_bytes": {"weight_bytes_read_per_step": 16_000_000_000, "kv_bytes_per_token": 131072},
               "scenarios": {"batch1": {"itl": {"mean_s": 0.005}}}}
    kernels = {"small": False, "ceilings": {"copy_GBps": 4000.0}, "kernels": [
        {"name": "decode_b64_ctx4k", "op": "paged_attention", "bw_vs_copy": 0.9},
        {"name": "decode_b1_ctx32k", "op": "paged_attention", "bw_vs_copy": 0.6},
        {"name": "softmax_attn_h32_2k", "op": "fused_softmax", "peers": {"torch_softmax": {"speedup": 1.4}}}]}
    results = {"latency": latency, "kernels": kernels, "throughput": None, "mixed": None}
    got = {t["name"]: t for t in summary.targets(results, dry_run=False)}
    bound = got["decode_step_vs_bandwidth_bound"]
    assert bound["value"] == pytest.approx(1.24413, rel=1e-5) and bound["met"] is True
    assert "200.0 tok/s" in bound["detail"]
    assert got["paged_decode_decode_b64_ctx4k_vs_copy"]["met"] is True
    assert got["paged_decode_decode_b1_ctx32k_vs_copy"]["met"] is False
    assert got["fused_softmax_softmax_attn_h32_2k_vs_torch_softmax"]["met"] is True
    assert got["throughput_1000x256_req_s"]["value"] is None and got["throughput_1000x256_req_s"]["met"] is None
    assert all(t["met"] is None for t in summary.targets(results, dry_run=True))


def test_phase_records_and_pytest_log_fallback(tmp_path):
    summary = load_summary_module()
    (tmp_path / "phases.tsv").write_text("build\tok\t0\t31.5\t90\t\npytest\ttimeout\t124\t150.2\t150\t\n")
    phases = summary.read_phases(str(tmp_path / "phases.tsv"), {"build": 90, "pytest": 150})
    assert phases["build"] == {"status": "ok", "rc": 0, "duration_s": 31.5, "limit_s": 90,
                               "budget_s": 90, "reason": None}
    assert phases["pytest"]["status"] == "timeout" and phases["pytest"]["rc"] == 124
    assert phases["mixed"]["status"] == "failed" and "no record" in phases["mixed"]["reason"]
    # pytest killed before its JUnit report: counts come from the -v lines of its log.
    (tmp_path / "pytest.log").write_text(
        "tests/ops/test_ops.py::test_a[cuda] PASSED                [ 1%]\n"
        "tests/ops/test_ops.py::test_b[cuda-bf16] FAILED           [ 2%]\n"
        "tests/engine/test_x.py::test_c SKIPPED (needs a thing)     [ 3%]\n"
        "noise PASSED\n")
    got = summary.pytest_results(str(tmp_path / "missing.xml"), str(tmp_path / "pytest.log"))
    assert (got["passed"], got["failed"], got["skipped"], got["total"]) == (1, 1, 1, 3)
    assert got["failures"] == [{"test": "tests/ops/test_ops.py::test_b[cuda-bf16]", "kind": "failed",
                                "message": ""}]


def test_gtest_json_results(tmp_path):
    summary = load_summary_module()
    (tmp_path / "g.json").write_text(json.dumps({"tests": 3, "testsuites": [{"name": "Cuda", "testsuite": [
        {"name": "A", "result": "COMPLETED"},
        {"name": "B", "result": "COMPLETED", "failures": [{"failure": "x != y"}]},
        {"name": "C", "result": "SKIPPED"}]}]}))
    got = summary.gtest_results(str(tmp_path / "g.json"))
    assert (got["tests"], got["passed"], got["failed"], got["skipped"]) == (3, 1, 1, 1)
    assert got["failures"] == [{"test": "Cuda.B", "message": "x != y"}] and got["skipped_tests"] == ["Cuda.C"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without a GPU")
def test_a_gpu_run_without_a_gpu_skips_every_phase_and_says_why(tmp_path):
    # Not a dry run: nothing is built or installed when torch sees no GPU, and the summary
    # still comes back, saying so.
    proc = gpu_check(tmp_path, timeout=120)
    assert proc.returncode == 1
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] is False and doc["ok"] is False
    for phase in doc["phases"].values():
        assert phase["status"] == "skipped" and phase["reason"] == "no CUDA GPU visible to torch"
    assert "torch sees no CUDA GPU" in (tmp_path / "gpu_check.log").read_text()
    assert not (tmp_path / "build.log").exists()
