"""fastllm.probe: the report's fields, the command runner's failure handling, the matrices."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastllm import probe

REPO = Path(__file__).resolve().parents[1]
RUN_COMMAND_KEYS = {"ok", "returncode", "stdout", "stderr", "error"}


def _run_module(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    return subprocess.run([sys.executable, "-m", "fastllm.probe", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_probe_json_has_every_field():
    proc = _run_module("--json", "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"host", "torch", "p2p", "nvidia_smi", "fastllm"}
    assert set(report["host"]) == {"python", "platform", "machine", "cpu_count"}
    t = report["torch"]
    assert set(t) == {"torch_version", "cuda_build", "nccl_version", "cuda_available",
                      "device_count", "gpus"}
    assert t["torch_version"] == torch.__version__
    assert t["cuda_build"] == torch.version.cuda
    assert t["cuda_available"] == torch.cuda.is_available()
    assert t["device_count"] == len(t["gpus"]) == len(report["p2p"])
    for gpu in t["gpus"]:
        assert set(gpu) == {"index", "name", "total_memory_bytes", "total_memory_gib",
                            "compute_capability", "sm_count"}
        assert gpu["total_memory_bytes"] > 0 and gpu["sm_count"] > 0
    assert set(report["nvidia_smi"]) == {"status", "topology", "query"}
    for res in report["nvidia_smi"].values():
        assert set(res) == RUN_COMMAND_KEYS
    f = report["fastllm"]
    assert set(f) == {"version", "native", "cuda_compiled", "cuda_archs", "cuda_ops",
                      "cuda_kernels_runnable", "nccl_library", "nccl_found", "build_info"}
    assert f["nccl_found"] == (f["nccl_library"] is not None)


def test_probe_text_report_says_plainly_when_there_is_no_gpu():
    proc = _run_module("--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    for section in ("== torch ==", "== peer-to-peer access", "== nvidia-smi ==", "== fastllm build =="):
        assert section in proc.stdout
    if not torch.cuda.is_available():
        assert "No CUDA GPU is available" in proc.stdout


def test_probe_json_to_file(tmp_path):
    out = tmp_path / "probe.json"
    proc = _run_module("--json", str(out), "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["torch"]["torch_version"] == torch.__version__


def test_run_command_success_and_failure_exit():
    ok = probe.run_command([sys.executable, "-c", "print('hello')"], timeout=60)
    assert ok == {"ok": True, "returncode": 0, "stdout": "hello\n", "stderr": "", "error": None}
    bad = probe.run_command([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                            timeout=60)
    assert bad["ok"] is False and bad["returncode"] == 3
    assert bad["stderr"] == "boom" and bad["error"] == "exit status 3"


def test_run_command_survives_a_missing_binary():
    res = probe.run_command(["fastllm-no-such-binary-xyz", "--version"], timeout=5)
    assert set(res) == RUN_COMMAND_KEYS
    assert res["ok"] is False and res["returncode"] is None
    assert "not found" in res["error"]


def test_run_command_kills_a_command_that_hangs_past_its_timeout():
    t0 = time.monotonic()
    res = probe.run_command(["sleep", "5"], timeout=0.5)
    # It returned without waiting for the sleep to finish (generous margin for a busy machine).
    assert time.monotonic() - t0 < 4.5
    assert res["ok"] is False and res["returncode"] is None
    assert "timed out" in res["error"]


@pytest.mark.parametrize("argv", ["nvidia-smi", [], [1, 2]])
def test_run_command_rejects_bad_argv(argv):
    with pytest.raises(ValueError, match="argv"):
        probe.run_command(argv)


def test_nccl_version_formats(monkeypatch):
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    assert probe.nccl_version() == "2.21.5"
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: 21805)   # old torch: NCCL_VERSION_CODE
    assert probe.nccl_version() == "2.18.5"
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: 2804)    # NCCL < 2.9 encoding
    assert probe.nccl_version() == "2.8.4"

    def missing():
        raise RuntimeError("NCCL not compiled in")
    monkeypatch.setattr(torch.cuda.nccl, "version", missing)
    assert probe.nccl_version() is None


def test_p2p_matrix_asks_every_ordered_pair(monkeypatch):
    asked = []

    def can_access(i, j):
        asked.append((i, j))
        return (i + j) % 2 == 1          # 0<->1 and 1<->2 linked, 0<->2 not
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", can_access)
    assert probe.p2p_matrix(3) == [[None, True, False], [True, None, True], [False, True, None]]
    assert sorted(asked) == [(i, j) for i in range(3) for j in range(3) if i != j]
    assert probe.p2p_matrix(0) == []


def test_find_nccl_library_honours_env(monkeypatch, tmp_path):
    lib = tmp_path / "libnccl.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("FASTLLM_NCCL_SO", str(lib))
    assert probe.find_nccl_library() == str(lib)
    monkeypatch.setenv("FASTLLM_NCCL_SO", str(tmp_path / "missing.so"))
    assert probe.find_nccl_library() is None


def test_find_nccl_library_in_site_packages(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLLM_NCCL_SO", raising=False)
    lib = tmp_path / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    assert probe.find_nccl_library() == str(lib)


def test_format_report_lists_gpus_and_p2p():
    ok = {"ok": True, "returncode": 0, "stdout": "GPU table\n", "stderr": "", "error": None}
    report = {
        "host": {"python": "3.11", "platform": "Linux", "machine": "x86_64", "cpu_count": 16},
        "torch": {"torch_version": "2.11.0", "cuda_build": "12.8", "nccl_version": "2.26.2",
                  "cuda_available": True, "device_count": 2,
                  "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 85 << 30,
                            "total_memory_gib": 85.0, "compute_capability": "9.0", "sm_count": 132}
                           for i in range(2)]},
        "p2p": [[None, True], [False, None]],
        "nvidia_smi": {"status": ok, "topology": ok, "query": ok},
        "fastllm": {"version": "0.1.0", "native": True, "cuda_compiled": True, "cuda_archs": "80;90",
                    "cuda_ops": ["paged_attention"], "cuda_kernels_runnable": True,
                    "nccl_library": "/x/libnccl.so.2", "nccl_found": True, "build_info": {}},
    }
    text = probe.format_report(report)
    assert "[1] NVIDIA H100 80GB HBM3: 85.0 GiB, compute capability 9.0, 132 SMs" in text
    assert "GPU0  -     yes" in text and "GPU1  no    -" in text
    assert "NCCL 2.26.2" in text and "/x/libnccl.so.2" in text
    assert "No CUDA GPU" not in text
