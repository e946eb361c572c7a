"""A `bench cpu` peer (llama.cpp, transformers) in its own process.

fastllm sets OMP_WAIT_POLICY=PASSIVE for torch's OpenMP runtime (fastllm.openmp_env),
and llama.cpp's ggml shares that runtime (the same libgomp.so.1) inside one process, so a
peer measured beside fastllm would run under fastllm's setting, not its own. Each peer
runs here instead, with the environment the bench started with, answering generate
requests as JSON lines:

    parent -> child: {"prompts": [[ids...], ...], "max_tokens": n}
    child -> parent: {"tokens": [[ids...], ...]}
    (first line: {"vocab_size": V, "omp_wait_policy": the child's OMP_WAIT_POLICY or null})
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


class PeerProcess:
    """An engine of fastllm.bench.cpu (by name) in a child process; generate() as theirs."""

    def __init__(self, name: str, path: str, threads: int):
        from fastllm import openmp_env
        env = dict(os.environ, **{openmp_env.OPT_OUT: "0"})
        env.pop("OMP_WAIT_POLICY", None)
        if openmp_env.ORIGINAL_WAIT_POLICY is not None:
            env["OMP_WAIT_POLICY"] = openmp_env.ORIGINAL_WAIT_POLICY
        self.proc = subprocess.Popen([sys.executable, "-m", "fastllm.bench.cpu_peer", name, path, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        first = self._read()
        if "error" in first:
            self.close()
            raise ImportError(first["error"])
        self.vocab_size = first["vocab_size"]
        self.omp_wait_policy = first["omp_wait_policy"]   # what the child's OpenMP runs under

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench peer exited with status {self.proc.wait()}")
        return json.loads(line)

    def generate(self, prompts, max_tokens):
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _serve(name: str, path: str, threads: int) -> None:
    import torch
    from fastllm.bench import cpu
    torch.set_num_threads(threads)
    try:
        engine = cpu.HFEngine(path) if name == "hf-f32" else \
            cpu.LlamaCppEngine(path, threads, flash_attn=name == "llama.cpp-fa")
    except ImportError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    print(json.dumps({"vocab_size": engine.vocab_size, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}),
          flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        tokens = engine.generate(request["prompts"], request["max_tokens"])
        print(json.dumps({"tokens": [list(map(int, t)) for t in tokens]}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
