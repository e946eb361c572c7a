"""Hostile model files: every one must fail fast with a ValueError naming the file
(and, where there is one, the field), never hang, crash or allocate gigabytes.

Each category's cases run in one child process (fuzz_runner.py) under a memory cap
(RLIMIT_AS) and a timeout, which report per case, so a hang or a huge allocation is a
failure naming the case rather than a stuck CI.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import cached_checkpoint, write_gguf

pytest.importorskip("gguf")

RUNNER = str(Path(__file__).with_name("fuzz_runner.py"))
PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")
MEMORY_CAP = 3 << 30          # bytes of address space for the child (imports take ~0.7 GB)
TIMEOUT_S = 60                # per category: the cases themselves take milliseconds each
# Peak resident memory a child may reach: the imports take ~350 MiB; a case that
# allocated from a size in the file before checking it would go far past this.
PEAK_RSS_MIB = 1200


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_cases(cases: list) -> dict:
    """{(case, call): (outcome, message)}; a call that never reported is absent."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    payload = json.dumps([{**c, "path": str(c["path"])} for c in cases])
    try:
        proc = subprocess.run([sys.executable, RUNNER], input=payload, capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env, preexec_fn=_cap_memory)
        stdout, stderr, status = proc.stdout, proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timed out after {TIMEOUT_S} s"
    results, last_started = {}, None
    for line in stdout.splitlines():
        record = json.loads(line)
        key = (record["case"], record["call"])
        if record.get("started"):
            last_started = key
        else:
            results[key] = (record["outcome"], record["message"], record["peak_rss_mib"])
    results["_status"] = (status, stderr[-2000:], last_started)
    return results


def check_all_rejected(cases: list) -> None:
    """Every call of every case raised ValueError naming the file and (when the case
    gives `match`) the field."""
    import re
    results = run_cases(cases)
    status, stderr, last_started = results["_status"]
    failures = []
    for case in cases:
        for call in case["calls"]:
            key = (case["name"], call)
            if key not in results:
                failures.append(f"{key}: no result ({status}; last started {last_started}) {stderr}")
                continue
            outcome, message, peak_mib = results[key]
            if peak_mib > PEAK_RSS_MIB:
                failures.append(f"{key}: peak resident memory {peak_mib} MiB > {PEAK_RSS_MIB} MiB")
            elif outcome != "ValueError":
                failures.append(f"{key}: {outcome}: {message[:300]}")
            elif Path(case["path"]).name not in message:
                failures.append(f"{key}: message does not name the file: {message[:300]}")
            elif case.get("match") and not re.search(case["match"], message):
                failures.append(f"{key}: message does not match {case['match']!r}: {message[:300]}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ raw GGUF bytes
U8, U32, I32, F32, STRING, ARRAY, U64 = 0, 4, 5, 6, 8, 9, 10


def gstr(b: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key.encode()) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims, ggml_type: int = 0, offset: int = 0, n_dims=None) -> bytes:
    return (gstr(name.encode()) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs=(), tensors=(), *, kv_count=None, tensor_count=None, version=3,
               data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


ARCH = kv("general.architecture", STRING, gstr(b"llama"))
HUGE = 1 << 63

HEADER_CASES = {
    # The 68-byte file of the issue: an array of 2^62 uint8 past the end.
    "array_2^62": (gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", U8, 1 << 62))]) + b"\0" * 8)[:68],
    "kv_count_2^63": gguf_bytes([ARCH], kv_count=HUGE),
    "tensor_count_2^63": gguf_bytes([ARCH], tensor_count=HUGE),
    "key_length_2^63": gguf_bytes([gstr(b"k", HUGE)]),
    "string_length_2^63": gguf_bytes([kv("general.name", STRING, gstr(b"x", HUGE))]),
    "string_length_past_end": gguf_bytes([kv("general.name", STRING, gstr(b"xy", 1000))]),
    "string_array_2^40": gguf_bytes([kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 40))]),
    "u64_array_2^61": gguf_bytes([kv("x", ARRAY, struct.pack("<IQ", U64, 1 << 61) + b"\0" * 64)]),
    "nested_arrays_deep": gguf_bytes([kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 200 + struct.pack("<IQ", U8, 0))]),
    "unknown_value_type": gguf_bytes([kv("x", 99, b"\0" * 16)]),
    "unknown_array_item_type": gguf_bytes([kv("x", ARRAY, struct.pack("<IQ", 77, 3) + b"\0" * 16)]),
    "bad_version": gguf_bytes([ARCH], version=99),
    "empty_file": b"",
    "magic_only": b"GGUF",
    "duplicate_key": gguf_bytes([ARCH, ARCH]),
    "alignment_zero": gguf_bytes([ARCH, kv("general.alignment", U32, struct.pack("<I", 0))]),
    "alignment_not_power_of_two": gguf_bytes([ARCH, kv("general.alignment", U32, struct.pack("<I", 24))]),
    "tensor_n_dims_2^32-1": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [64], n_dims=0xFFFFFFFF)]),
    "tensor_dims_2^63": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [HUGE, HUGE, HUGE, HUGE])]),
    "tensor_offset_2^63": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [4, 4], offset=HUGE)],
                                     data=b"\0" * 64),
    "tensor_data_past_end": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [64, 64])], data=b"\0" * 64),
    "tensor_unknown_type": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [4], ggml_type=999)],
                                      data=b"\0" * 64),
    "tensor_misaligned_offset": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [4], offset=3)],
                                           data=b"\0" * 64),
    "tensor_row_not_whole_blocks": gguf_bytes([ARCH], [tensor_info("token_embd.weight", [33, 2], ggml_type=2)],
                                              data=b"\0" * 4096),
    "duplicate_tensor": gguf_bytes([ARCH], [tensor_info("a", [4]), tensor_info("a", [4])], data=b"\0" * 64),
    "tensor_name_length_2^63": gguf_bytes([ARCH], [gstr(b"t", HUGE)]),
}


def test_gguf_header_fuzz(tmp_path):
    cases = []
    for name, data in HEADER_CASES.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        cases.append({"name": name, "path": path, "calls": ["load_model", "tokenizer"]})
    check_all_rejected(cases)


# ------------------------------------------------------------------ truncations
def test_gguf_truncations(tmp_path):
    """A real (tiny) GGUF cut at many offsets: header, metadata, tensor index, data."""
    good = write_gguf(cached_checkpoint("llama"), tmp_path / "good.gguf")
    data = good.read_bytes()
    offsets = sorted(set(list(range(0, 64, 3)) + [len(data) * k // 41 for k in range(1, 41)]
                         + [len(data) - 1]))
    cases = []
    for offset in offsets:
        path = tmp_path / f"cut_{offset}.gguf"
        path.write_bytes(data[:offset])
        cases.append({"name": f"cut_{offset}", "path": path, "calls": ["load_model", "tokenizer"]})
    check_all_rejected(cases)
