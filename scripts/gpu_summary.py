"""scripts/gpu_check.sh's JSON summary: one file with the commit, the GPU, torch, every
phase's status and duration, every figure the phases wrote, and issue 10's targets beside
the values measured in the same run.

    python scripts/gpu_summary.py --probe-env            # environment facts as JSON (stdout)
    python scripts/gpu_summary.py --work DIR --out summary.json --commit C ... [--dry-run]

Standard library only, except --probe-env (which imports torch): the summary must still be
written when the build or torch is what failed. Exit status of the summary mode: 0 when
every selected phase passed, 1 when one did not.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Optional

SCHEMA = "fastllm-gpu-check/1"
PHASES = ("build", "cpptest", "pytest", "kernels", "latency", "throughput", "mixed")
STATUSES = ("ok", "failed", "timeout", "skipped", "not_selected")
BENCH_PHASES = ("kernels", "latency", "throughput", "mixed")
MODULES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "nvtx", "hypothesis",
           "pytest", "pytest_timeout", "jinja2", "matplotlib")


def probe_env() -> dict:
    """Python, torch, CUDA and which test dependencies import, on this machine."""
    import importlib.util
    import platform
    env = {"python": platform.python_version(), "executable": sys.executable,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "modules": {m: importlib.util.find_spec(m) is not None for m in MODULES},
           "requirements_not_installed": requirements_not_installed()}
    try:
        import torch
    except ImportError as e:
        env.update(torch=None, cuda_available=False, error=str(e))
        return env
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2**30, 1))
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def requirements_not_installed() -> Optional[list]:
    """pyproject's runtime and test requirements with no installed distribution here
    (None where pyproject cannot be read): what a test module may fail to import."""
    import importlib.metadata
    try:
        import tomllib
        with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
    except (ImportError, OSError, KeyError, ValueError):
        return None
    reqs = project.get("dependencies", []) + project.get("optional-dependencies", {}).get("test", [])
    absent = []
    for req in reqs:
        name = re.match(r"\s*([A-Za-z0-9._-]+)", req).group(1)
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    return absent


# -- reading what the phases left -----------------------------------------------------------------

def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_phases(path: str, budgets: dict) -> dict:
    """phases.tsv (name, status, rc, duration_s, limit_s, reason) -> {name: record}; a phase
    that left no line (the script died first) is reported as such."""
    phases = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f, delimiter="\t"):
                if len(row) < 6:
                    continue
                name, status, rc, duration, limit, reason = row[:6]
                phases[name] = {"status": status if status in STATUSES else "failed",
                                "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                                "duration_s": float(duration), "limit_s": int(float(limit)),
                                "budget_s": budgets.get(name), "reason": reason or None}
    except OSError:
        pass
    for name in PHASES:
        phases.setdefault(name, {"status": "failed", "rc": None, "duration_s": 0.0, "limit_s": 0,
                                 "budget_s": budgets.get(name),
                                 "reason": "no record: gpu_check.sh stopped before it"})
    return {name: phases[name] for name in PHASES}


def read_gpu_csv(path: str) -> Optional[dict]:
    """nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError:
        return None
    parts = [p.strip() for p in first.split(",")]
    if len(parts) != 3:
        return None
    name, memory, driver = parts
    return {"name": name, "memory_total_MiB": int(memory) if memory.isdigit() else memory,
            "driver": driver}


def pytest_results(xml_path: str, log_path: str) -> Optional[dict]:
    """Counts and the failing tests (with the first lines of their message), from the JUnit
    XML; from `pytest -v` lines in the phase log when pytest was killed before writing it."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return _pytest_from_log(log_path)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skip_reasons = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "")[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "kind": outcome.tag,
                             "message": (outcome.get("message") or outcome.text or "")[:500]})
    return {"source": "junit", **counts, "total": sum(counts.values()), "failures": failures,
            "skip_reasons": skip_reasons}


_PYTEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _pytest_from_log(log_path: str) -> Optional[dict]:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
           "SKIPPED": "skipped", "XFAIL": "skipped"}
    failures = []
    for line in lines:
        m = _PYTEST_LINE.match(line)
        if m:
            counts[key[m.group(2)]] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                failures.append({"test": m.group(1), "kind": m.group(2).lower(), "message": ""})
    return {"source": "log (pytest was stopped before its JUnit report)", **counts,
            "total": sum(counts.values()), "failures": failures, "skip_reasons": {}}


def gtest_results(path: str) -> Optional[dict]:
    """--gtest_output=json -> counts, failures (with messages) and skipped test names."""
    doc = read_json(path)
    if doc is None:
        return None
    passed, failures, skipped = 0, [], []
    for suite in doc.get("testsuites", []):
        for test in suite.get("testsuite", []):
            name = f"{suite.get('name')}.{test.get('name')}"
            if test.get("failures"):
                failures.append({"test": name, "message": "\n".join(
                    f.get("failure", "") for f in test["failures"])[:500]})
            elif test.get("result") == "SKIPPED":
                skipped.append(name)
            else:
                passed += 1
    return {"tests": doc.get("tests"), "passed": passed, "failed": len(failures),
            "skipped": len(skipped), "failures": failures, "skipped_tests": skipped}


# -- the targets of issue 10 -----------------------------------------------------------------------

def _target(name: str, value, target: float, op: str, unit: str, detail: str, dry_run: bool) -> dict:
    met = None
    if value is not None and not dry_run:
        met = value >= target if op == ">=" else value <= target
    return {"name": name, "value": value, "target": target, "op": op, "unit": unit,
            "met": met, "detail": detail}


def _kernel(kernels: Optional[dict], name: str) -> Optional[dict]:
    for k in (kernels or {}).get("kernels", []):
        if k.get("name") == name:
            return k
    return None


def targets(results: dict, dry_run: bool) -> list:
    """Each target beside its value (None where the phase left none). On a dry run the
    values are CPU toys and `met` is None: only the plumbing is being checked."""
    kernels, out = results.get("kernels"), []

    def add(*args):
        out.append(_target(*args, dry_run=dry_run))
    decode_cases = [("decode_b64_ctx4k", 0.85), ("decode_b1_ctx32k", 0.70)]
    if kernels and kernels.get("small"):
        decode_cases = [("decode_b4_ctx512", 0.85), ("decode_b1_ctx2k", 0.70)]   # the CPU's cases
    for case, bar in decode_cases:
        k = _kernel(kernels, case)
        add(f"paged_decode_{case}_vs_copy", k and k.get("bw_vs_copy"), bar, ">=", "fraction",
            "bytes the kernel must move / time, over the device-to-device copy bandwidth")
    for k in (kernels or {}).get("kernels", []):
        if k.get("op") == "fused_softmax":
            peer = k.get("peers", {}).get("torch_softmax", {})
            add(f"fused_softmax_{k['name']}_vs_torch_softmax", peer.get("speedup"), 1.0, ">=",
                "x", "torch.softmax time / fused_softmax time on the same scores")
    add("decode_step_vs_bandwidth_bound", *_decode_bound(results.get("latency"), kernels))
    throughput = results.get("throughput") or {}
    fast = throughput.get("engines", {}).get("fastllm", {})
    add("throughput_1000x256_req_s", fast.get("requests_per_s"), 25.0, ">=", "req/s",
        "vLLM's published H100 figure; transformers static on one batch of 256 beside it")
    mixed = results.get("mixed") or {}
    ratio = mixed.get("ratios", {}).get("fastllm/hf_continuous", {}).get("output_tok_s")
    add("mixed_vs_hf_continuous", ratio, 10.0, ">=", "x",
        "output tok/s of fastllm / transformers' continuous batching, same requests")
    agree = throughput.get("agreement", {}).get("hf_static", {})
    add("bf16_first_16_tokens_vs_transformers", agree.get("first_16_identical_fraction"), 0.5,
        ">=", "fraction of requests", "greedy tokens, same random weights ('most prompts')")
    return out


def _decode_bound(latency: Optional[dict], kernels: Optional[dict]) -> tuple:
    """Batch-1 decode step time / ((weights read + KV read) / copy bandwidth), bar 1.25."""
    detail = "batch-1 mean inter-token time over (weight + KV bytes read) / copy bandwidth"
    try:
        step = latency["scenarios"]["batch1"]["itl"]["mean_s"]
        b = latency["decode_bytes"]
        copy = kernels["ceilings"]["copy_GBps"] * 1e9
        # The mean context of a batch-1 decode step: the prompt plus half the output.
        context = latency["input_len"] + latency["output_len"] / 2
    except (TypeError, KeyError):
        return None, 1.25, "<=", "x", detail
    bound = (b["weight_bytes_read_per_step"] + b["kv_bytes_per_token"] * context) / copy
    return step / bound, 1.25, "<=", "x", f"{detail}; {1 / step:.1f} tok/s, bound {bound * 1e3:.3f} ms"


# -- the summary --------------------------------------------------------------------------------

def summarize(args) -> dict:
    budgets = dict(kv.split("=", 1) for kv in args.budgets.split(",") if kv) if args.budgets else {}
    budgets = {k: int(v) for k, v in budgets.items()}
    w = lambda name: os.path.join(args.work, name)   # noqa: E731
    phases = read_phases(w("phases.tsv"), budgets)
    results = {name: read_json(w(f"{name}.json")) for name in BENCH_PHASES}
    results["pytest"] = pytest_results(w("pytest.xml"), w("pytest.log"))
    results["cpptest"] = gtest_results(w("cpptest.json"))
    selected = [p for p, r in phases.items() if r["status"] != "not_selected"]
    return {
        "schema": SCHEMA, "dry_run": bool(args.dry_run),
        "commit": args.commit, "commit_from": args.commit_from,
        "prepared": {"source_hash": args.source_hash, "gpu_dir_source_hash": args.prepared_hash,
                     "matches": None if args.prepared_hash in (None, "none")
                     else args.prepared_hash == args.source_hash},
        "started_utc": datetime.datetime.fromtimestamp(args.started, datetime.timezone.utc)
                       .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.time() - args.started, 1), "total_budget_s": args.total_budget,
        "gpu": read_gpu_csv(w("gpu.csv")), "env": read_json(w("env.json")),
        "build": read_json(w("build_info.json")),
        "phases": phases, "ok": bool(selected) and all(phases[p]["status"] == "ok" for p in selected),
        "results": results, "targets": targets(results, args.dry_run),
    }


def _finite(obj):
    """NaN and infinities as null: strict JSON parsers reject them."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_summary(doc: dict) -> str:
    lines = [f"summary ({'dry run' if doc['dry_run'] else 'GPU'}): commit {doc['commit']}, "
             f"GPU {(doc['gpu'] or {}).get('name')}, torch {(doc['env'] or {}).get('torch')}, "
             f"{doc['wall_s']} s of {doc['total_budget_s']} s"]
    for name, p in doc["phases"].items():
        lines.append(f"  {name:<11} {p['status']:<12} {p['duration_s']:>6.1f} s / {p['limit_s']} s"
                     f"{'  ' + p['reason'] if p['reason'] else ''}")
    for t in doc["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  target {t['name']:<52} {value:>8} {t['op']} {t['target']:<5} {met}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe-env", action="store_true")
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--commit-from", default="none")
    p.add_argument("--source-hash", default=None)
    p.add_argument("--prepared-hash", default=None)
    p.add_argument("--started", type=float, default=time.time())
    p.add_argument("--total-budget", type=int, default=None)
    p.add_argument("--budgets", default="")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.probe_env:
        print(json.dumps(probe_env(), indent=2))
        return 0
    if not (args.work and args.out):
        p.error("--work and --out are required (or --probe-env)")
    doc = summarize(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(_finite(doc), f, indent=2, allow_nan=False)
        f.write("\n")
    print(format_summary(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
