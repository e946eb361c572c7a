"""`python -m fastllm.bench serve --compare`: fastllm's server vs `transformers serve`.

Both serve one Hugging Face checkpoint on CPU, on loopback ports, one after the other
(they would otherwise share the same cores), and get the same seeded requests. The
request body is the same for both, so no `ignore_eos` (transformers rejects unknown
fields): with greedy sampling both produce the same tokens and stop at the same places,
and throughput counts the tokens each server reports in its usage block.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from fastllm.bench.serve_stats import format_report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on a loopback port, waited on until GET /health answers 200,
    and stopped (SIGTERM, then SIGKILL) on exit: never left behind."""

    def __init__(self, name: str, argv: List[str], port: int, env: Optional[Dict[str, str]] = None):
        self.name, self.argv, self.port = name, argv, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"fastllm-bench-{name}-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env or os.environ.copy())

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout_s: float) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def fastllm_argv(checkpoint: str, port: int) -> List[str]:
    return [sys.executable, "-m", "fastllm.serve", "--model", checkpoint, "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32"]


def transformers_argv(checkpoint: str, port: int) -> List[str]:
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which("transformers")
    if exe is None:
        raise ValueError("--compare needs the `transformers` CLI (pip install 'transformers[serving]')")
    return [exe, "serve", checkpoint, "--device", "cpu", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port)]


def default_checkpoint() -> str:
    """The default SmolLM2 GGUF dequantized into a Hugging Face directory (fp32), once,
    in the fastllm cache: `transformers serve` loads HF directories most simply."""
    from fastllm import envs
    from fastllm.model.default_model import default_model_path
    gguf = default_model_path()
    out = Path(envs.FASTLLM_CACHE) / (gguf.stem + "-hf")
    if not (out / "model.safetensors").is_file():
        _convert_gguf(gguf, out)
    return str(out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)       # tied: stored once, as the embedding
    partial = out.with_name(out.name + f".{os.getpid()}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(partial)
    config_file = partial / "config.json"      # the weights are plain fp32 now, not GGUF
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]   # GGUF configs lack it; loaders need it
    config_file.write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(partial)
    tok.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def compare_servers(args: argparse.Namespace) -> Dict[str, object]:
    from fastllm.bench.serve import bench_url, ratios
    checkpoint = args.checkpoint or default_checkpoint()
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint!r} is not a Hugging Face directory")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result: Dict[str, object] = {"checkpoint": checkpoint}
    servers = (("fastllm", fastllm_argv, args.fastllm_flags),
               ("transformers", transformers_argv, args.transformers_flags))
    for name, argv_of, flags in servers:
        port = free_port()
        argv = argv_of(checkpoint, port) + shlex.split(flags)
        with ServerProcess(name, argv, port, env) as server:
            server.wait_healthy(args.server_timeout)
            summary = bench_url(args, server.url, ignore_eos=False)
        summary["server_command"] = " ".join(argv)
        result[name] = summary
        print(format_report(summary, title=name))
    result["ratio_fastllm_over_transformers"] = ratios(result["fastllm"], result["transformers"])
    print("fastllm / transformers:")
    for line in _key_ratios(result["ratio_fastllm_over_transformers"]):
        print("  " + line)
    return result


def _key_ratios(r: Dict[str, float]) -> List[str]:
    keys = ("request_throughput", "output_throughput", "ttft_ms.p50", "ttft_ms.p99",
            "tpot_ms.p50", "itl_ms.p50", "itl_ms.p99", "e2e_ms.p50", "e2e_ms.p99")
    return [f"{k:<20} {r[k]:.3f}" for k in keys if k in r]
