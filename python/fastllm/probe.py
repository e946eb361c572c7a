"""`python -m fastllm.probe`: what this machine and this fastllm build can do.

Reports the torch stack (version, CUDA build, NCCL version, GPUs with memory, compute
capability and SM count), the GPU peer-to-peer access matrix, an nvidia-smi bundle
(status, topology, clocks/power/memory query) and the fastllm build (native module,
CUDA kernels, archs, NCCL library). Human-readable by default; `--json` prints one JSON
object (`--json FILE` writes it). A machine with no GPU gets the same report, with the
GPU parts saying so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence


NVIDIA_SMI_COMMANDS = {
    "status": ["nvidia-smi"],
    "topology": ["nvidia-smi", "topo", "-m"],
    "query": ["nvidia-smi", "--query-gpu=index,name,clocks.sm,clocks.mem,power.draw,"
              "memory.used,memory.total", "--format=csv"],
}


def run_command(argv: Sequence[str], timeout: float = 30.0) -> dict:
    """Run argv (no shell) and capture it; never raises for a missing binary, a non-zero
    exit or a hang past `timeout` seconds (the process is killed).

    -> {ok, returncode, stdout, stderr, error}: ok is True only for exit status 0;
    returncode is None when the command did not finish; error says why it failed."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a non-empty list of strings (no shell), got {argv!r}")
    result = {"ok": False, "returncode": None, "stdout": "", "stderr": "", "error": None}
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              errors="replace", stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        result["error"] = f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired as e:
        result["error"] = f"timed out after {timeout:g} s"
        result["stdout"] = _text(e.stdout)
        result["stderr"] = _text(e.stderr)
    except OSError as e:                      # permission denied, exec format error, ...
        result["error"] = f"{argv[0]}: {e}"
    else:
        result.update(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr,
                      ok=proc.returncode == 0)
        if proc.returncode != 0:
            result["error"] = f"exit status {proc.returncode}"
    return result


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# -- torch ---------------------------------------------------------------------------------

def torch_stack_info() -> dict:
    import torch
    info = {
        "torch_version": torch.__version__,
        "cuda_build": torch.version.cuda,            # None for a CPU-only torch wheel
        "nccl_version": nccl_version(),
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpus": [],
    }
    for i in range(info["device_count"]):
        props = torch.cuda.get_device_properties(i)
        info["gpus"].append({
            "index": i,
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "total_memory_gib": round(props.total_memory / (1 << 30), 2),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": int(props.multi_processor_count),
        })
    return info


def nccl_version() -> Optional[str]:
    """The NCCL torch was built with, as 'major.minor.patch'; None without one."""
    import torch
    try:
        version = torch.cuda.nccl.version()
    except Exception:                         # CPU wheel: no NCCL compiled in
        return None
    if isinstance(version, tuple):
        return ".".join(str(v) for v in version)
    if isinstance(version, int):              # old torch returns NCCL_VERSION_CODE
        # NCCL >= 2.9: major*10000 + minor*100 + patch (21805 = 2.18.5); before: major*1000 + ...
        major_scale = 10000 if version >= 10000 else 1000
        return f"{version // major_scale}.{version % major_scale // 100}.{version % 100}"
    return str(version)


def p2p_matrix(device_count: int) -> list:
    """matrix[i][j]: can GPU i read/write GPU j's memory directly (NVLink or PCIe P2P)?
    The diagonal is None (a device to itself is not a peer access)."""
    import torch
    return [[None if i == j else bool(torch.cuda.can_device_access_peer(i, j))
             for j in range(device_count)] for i in range(device_count)]


# -- nvidia-smi ----------------------------------------------------------------------------

def nvidia_smi_bundle(timeout: float = 30.0) -> dict:
    """{status|topology|query: run_command result} for the nvidia-smi commands."""
    return {name: run_command(argv, timeout) for name, argv in NVIDIA_SMI_COMMANDS.items()}


# -- fastllm build -------------------------------------------------------------------------

def find_nccl_library() -> Optional[str]:
    """The libnccl file the communicator would open first (fastllm.ops.nccl_library_candidates:
    $FASTLLM_NCCL_SO, else torch's wheel copy in site-packages/nvidia/nccl/lib). None when
    none exists (the loader's search path may still have one)."""
    from fastllm import ops
    return next((c for c in ops.nccl_library_candidates() if os.sep in c and os.path.isfile(c)), None)


def fastllm_build_info() -> dict:
    from fastllm import __version__, ops
    build = ops.build_info()
    nccl = find_nccl_library()
    return {
        "version": __version__,
        "native": ops.native_available(),
        "cuda_compiled": bool(build.get("cuda", False)),
        "cuda_archs": build.get("cuda_archs"),
        "cuda_ops": list(build.get("cuda_ops", [])),
        "cuda_kernels_runnable": ops.cuda_available(),
        "nccl_library": nccl,
        "nccl_found": nccl is not None,
        "build_info": {k: _jsonable(v) for k, v in build.items()},
    }


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# -- the report ----------------------------------------------------------------------------

def collect(timeout: float = 30.0) -> dict:
    torch_info = torch_stack_info()
    return {
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "torch": torch_info,
        "p2p": p2p_matrix(torch_info["device_count"]),
        "nvidia_smi": nvidia_smi_bundle(timeout),
        "fastllm": fastllm_build_info(),
    }


def format_report(report: dict) -> str:
    t, f, host = report["torch"], report["fastllm"], report["host"]
    lines = [
        "== host ==",
        f"python {host['python']} on {host['platform']} ({host['cpu_count']} CPUs)",
        "== torch ==",
        f"torch {t['torch_version']}, CUDA build {t['cuda_build'] or 'none (CPU wheel)'}, "
        f"NCCL {t['nccl_version'] or 'none'}",
    ]
    if not t["cuda_available"]:
        lines.append("No CUDA GPU is available: torch.cuda.is_available() is False.")
    else:
        lines.append(f"{t['device_count']} CUDA GPU(s):")
        for g in t["gpus"]:
            lines.append(f"  [{g['index']}] {g['name']}: {g['total_memory_gib']} GiB, "
                         f"compute capability {g['compute_capability']}, {g['sm_count']} SMs")
    lines.append("== peer-to-peer access (row -> column) ==")
    p2p = report["p2p"]
    if len(p2p) < 2:
        lines.append(f"n/a ({len(p2p)} GPU{'s' if len(p2p) != 1 else ''}: no pairs)")
    else:
        lines.append("     " + " ".join(f"GPU{j:<2}" for j in range(len(p2p))))
        for i, row in enumerate(p2p):
            cells = " ".join(f"{'-' if v is None else ('yes' if v else 'no'):<5}" for v in row)
            lines.append(f"GPU{i:<2} {cells}")
    lines.append("== nvidia-smi ==")
    for name, res in report["nvidia_smi"].items():
        argv = " ".join(NVIDIA_SMI_COMMANDS[name])
        if res["ok"]:
            lines.append(f"$ {argv}\n{res['stdout'].rstrip()}")
        else:
            detail = (res["stderr"] or res["stdout"]).strip().splitlines()
            lines.append(f"$ {argv}: failed ({res['error']})" + (f": {detail[0]}" if detail else ""))
    lines += [
        "== fastllm build ==",
        f"fastllm {f['version']}, native module {'yes' if f['native'] else 'no (torch fallbacks)'}",
        f"CUDA kernels compiled: {'yes, archs ' + str(f['cuda_archs']) if f['cuda_compiled'] else 'no'}"
        + (f"; ops {', '.join(f['cuda_ops'])}" if f["cuda_ops"] else "")
        + f"; runnable here: {'yes' if f['cuda_kernels_runnable'] else 'no'}",
        f"NCCL library: {f['nccl_library'] or 'not found (set FASTLLM_NCCL_SO)'}",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastllm.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="print the report as JSON (or write it to FILE)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds each nvidia-smi command may take (default 30)")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    report = collect(args.timeout)
    if args.json is None:
        print(format_report(report))
    elif args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
