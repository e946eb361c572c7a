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

gguf = pytest.importorskip("gguf")

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


# ------------------------------------------------------------------ metadata vs tensors
A = "llama."
GGUF_METADATA_CASES = {
    # name: (metadata written over a real tiny file's, what the error must name)
    "hidden_32768_ffn_131072": ({A + "embedding_length": 32768, A + "feed_forward_length": 131072,
                                 A + "attention.key_length": 16},
                                r"tensor '[a-z_.0-9]+' .*has shape .*expected .*llama\.(embedding_length|feed_forward_length)"),
    "block_count_3000": ({A + "block_count": 3000}, r"num_hidden_layers \[llama\.block_count\] = 3000"),
    "block_count_1": ({A + "block_count": 1}, r"unexpected tensor 'blk\.1\."),
    "head_count_0": ({A + "attention.head_count": 0}, r"llama\.attention\.head_count must be a positive integer"),
    "head_count_string": ({A + "attention.head_count": "four"}, r"llama\.attention\.head_count must be a number"),
    "head_count_kv_0": ({A + "attention.head_count_kv": 0}, r"llama\.attention\.head_count_kv must be a positive"),
    "head_count_kv_3": ({A + "attention.head_count_kv": 3}, r"num_key_value_heads"),
    "key_length_0": ({A + "attention.key_length": 0}, r"llama\.attention\.key_length must be a positive"),
    "embedding_length_float": ({A + "embedding_length": 64.5}, r"llama\.embedding_length must be a positive integer"),
    "ffn_96": ({A + "feed_forward_length": 96}, r"'blk\.0\.ffn_(gate|up|down)\.weight' .*llama\.feed_forward_length"),
    "rms_eps_nan": ({A + "attention.layer_norm_rms_epsilon": float("nan")}, r"layer_norm_rms_epsilon must be finite"),
    "rope_base_inf": ({A + "rope.freq_base": float("inf")}, r"rope\.freq_base must be finite"),
    # A claimed context far past any model's: allocates nothing (RoPE is per step).
    "context_length_2^40": ({A + "context_length": (1 << 40, gguf.GGUFValueType.UINT64)}, None),
}


def test_gguf_metadata_inconsistent_with_tensors(tmp_path):
    hf = cached_checkpoint("llama")
    cases = []
    for name, (metadata, match) in GGUF_METADATA_CASES.items():
        path = write_gguf(hf, tmp_path / f"{name}.gguf", metadata=metadata)
        cases.append({"name": name, "path": path, "calls": ["load_model"], "match": match})
    # The context-length case loads (nothing is sized by it); every other one fails.
    huge = cases.pop()
    check_all_rejected(cases)
    results = run_cases([huge])
    outcome, message, peak = results[(huge["name"], "load_model")]
    assert outcome == "ok" and peak < PEAK_RSS_MIB, (outcome, message, peak)


# ------------------------------------------------------------------ HF directories
def _copy_checkpoint(tmp_path, name) -> Path:
    import shutil
    dest = tmp_path / name
    shutil.copytree(cached_checkpoint("llama"), dest)
    return dest


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


HF_CONFIG_CASES = {
    "hidden_32768_ffn_131072": (dict(hidden_size=32768, intermediate_size=131072, head_dim=16),
                                r"tensor '\S+' has shape .*expected .*(hidden_size|intermediate_size)"),
    "layers_3000": (dict(num_hidden_layers=3000), r"num_hidden_layers = 3000 but the checkpoint holds"),
    "heads_0": (dict(num_attention_heads=0), r"num_attention_heads must be a positive integer"),
    "heads_string": (dict(num_attention_heads="4"), r"num_attention_heads must be a positive integer"),
    "hidden_null_heads": (dict(num_key_value_heads=0), r"num_key_value_heads must be a positive integer"),
    "vocab_negative": (dict(vocab_size=-1), r"vocab_size must be a positive integer"),
    "rope_theta_string": (dict(rope_theta="big", rope_parameters=None), r"rope_theta must be a finite number"),
    "rope_scaling_string": (dict(rope_scaling="linear", rope_parameters=None), r"rope_scaling must be an object"),
    "rope_factor_string": (dict(rope_scaling={"rope_type": "linear", "factor": "x"}, rope_parameters=None),
                           r"rope_scaling\.factor must be a positive number"),
    "architectures_number": (dict(architectures=7), r"'architectures' must be a list of strings"),
}


def _safetensors_rewrite(file: Path, edit) -> None:
    """Re-serialize a safetensors file after edit(header dict) (data bytes unchanged)."""
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first_tensor(header):
    return next(v for k, v in header.items() if k != "__metadata__")


SAFETENSORS_CASES = {
    "header_length_2^63": (lambda d: struct.pack("<Q", HUGE) + d[8:], r"header length"),
    "header_length_past_end": (lambda d: struct.pack("<Q", len(d)) + d[8:], r"header length"),
    "header_length_zero": (lambda d: struct.pack("<Q", 0) + d[8:], r"safetensors"),
    "seven_bytes": (lambda d: d[:7], r"too short"),
    "cut_in_header": (lambda d: d[:200], r"header length|safetensors"),
    "cut_in_data": (lambda d: d[:len(d) // 2], r"safetensors"),
}
SAFETENSORS_HEADER_EDITS = {
    "offsets_past_end": lambda h: _first_tensor(h).update(data_offsets=[0, HUGE]),
    "shape_larger_than_data": lambda h: _first_tensor(h).update(shape=[4096, 4096]),
    "unknown_dtype": lambda h: _first_tensor(h).update(dtype="F99"),
    "negative_dim": lambda h: _first_tensor(h).update(shape=[-1, 64]),
}


def test_hf_directory_fuzz(tmp_path):
    cases = []
    for name, (changes, match) in HF_CONFIG_CASES.items():
        path = _copy_checkpoint(tmp_path, f"cfg_{name}")
        _edit_config(path, **changes)
        cases.append({"name": name, "path": path, "calls": ["load_model"], "match": match})
    path = _copy_checkpoint(tmp_path, "config_not_utf8")
    (path / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    (path / "tokenizer_config.json").write_bytes(b'{"bos_token": "\xff"}')
    cases.append({"name": "not_utf8", "path": path, "calls": ["load_model", "tokenizer"],
                  "match": r"(config|tokenizer_config)\.json: not UTF-8"})
    side_files = {   # name: (file, its JSON, which loader reads it, what the error names)
        "generation_temperature_string": ("generation_config.json", {"temperature": "hot"}, "load_model",
                                          r"generation_config\.json: temperature"),
        "generation_eos_string": ("generation_config.json", {"eos_token_id": ["two"]}, "tokenizer",
                                  r"generation_config\.json: eos_token_id"),
        "chat_template_number": ("tokenizer_config.json", {"chat_template": 5}, "tokenizer",
                                 r"tokenizer_config\.json: chat_template"),
        "chat_template_bad_list": ("tokenizer_config.json", {"chat_template": [{"name": "default"}]},
                                   "tokenizer", r"tokenizer_config\.json: chat_template"),
    }
    for name, (file, content, call, match) in side_files.items():
        path = _copy_checkpoint(tmp_path, name)
        (path / file).write_text(json.dumps(content))
        cases.append({"name": name, "path": path, "calls": [call], "match": match})
    path = _copy_checkpoint(tmp_path, "config_list")
    (path / "config.json").write_text("[1, 2]")
    cases.append({"name": "config_list", "path": path, "calls": ["load_model"], "match": "JSON object"})
    for name, (cut, match) in SAFETENSORS_CASES.items():
        path = _copy_checkpoint(tmp_path, f"st_{name}")
        file = path / "model.safetensors"
        file.write_bytes(cut(file.read_bytes()))
        cases.append({"name": name, "path": path, "calls": ["load_model"], "match": match})
    for name, edit in SAFETENSORS_HEADER_EDITS.items():
        path = _copy_checkpoint(tmp_path, f"st_{name}")
        _safetensors_rewrite(path / "model.safetensors", edit)
        cases.append({"name": name, "path": path, "calls": ["load_model"], "match": "model.safetensors"})
    check_all_rejected(cases)
    # A claimed context far past any model's loads and allocates nothing for it.
    path = _copy_checkpoint(tmp_path, "context_2^40")
    _edit_config(path, max_position_embeddings=1 << 40, rope_scaling=None)
    outcome, message, peak = run_cases([{"name": "ctx", "path": path, "calls": ["load_model"]}])[("ctx", "load_model")]
    assert outcome == "ok" and peak < PEAK_RSS_MIB, (outcome, message, peak)


# ------------------------------------------------------------------ embedded vocabularies
def _vocab_gguf(path: Path, **overrides) -> Path:
    """A tiny byte-level (gpt2) vocabulary GGUF, with metadata overrides:
    key -> (value, GGUFValueType[, item type])."""
    T = gguf.GGUFValueType
    kv = {"tokenizer.ggml.model": ("gpt2", T.STRING),
          "tokenizer.ggml.tokens": (["a", "b", "c", "ab", "abc", "<s>", "</s>"], T.ARRAY, T.STRING),
          "tokenizer.ggml.merges": (["a b", "ab c"], T.ARRAY, T.STRING),
          "tokenizer.ggml.token_type": ([1] * 5 + [3, 3], T.ARRAY, T.INT32),
          "tokenizer.ggml.bos_token_id": (5, T.UINT32), "tokenizer.ggml.eos_token_id": (6, T.UINT32)}
    kv.update(overrides)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, *item) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=item[0] if item else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_vocabulary_fuzz(tmp_path):
    T = gguf.GGUFValueType
    bad = {
        "tokens_a_string": ({"tokenizer.ggml.tokens": ("abc", T.STRING)}, r"tokenizer\.ggml\.tokens"),
        "tokens_ints": ({"tokenizer.ggml.tokens": ([1, 2, 3], T.ARRAY, T.INT32)}, r"tokenizer\.ggml\.tokens"),
        "merge_without_space": ({"tokenizer.ggml.merges": (["ab"], T.ARRAY, T.STRING)}, r"merges\[0\]"),
        "merge_not_in_vocab": ({"tokenizer.ggml.merges": (["a b", "a c"], T.ARRAY, T.STRING)}, r"merges\[1\]"),
        "merges_ints": ({"tokenizer.ggml.merges": ([1, 2], T.ARRAY, T.INT32)}, r"tokenizer\.ggml\.merges"),
        "types_short": ({"tokenizer.ggml.token_type": ([1], T.ARRAY, T.INT32)}, r"token_type"),
        "types_strings": ({"tokenizer.ggml.token_type": (["x"] * 7, T.ARRAY, T.STRING)}, r"token_type"),
        "bos_a_string": ({"tokenizer.ggml.bos_token_id": ("one", T.STRING)}, r"bos_token_id"),
        "model_an_int": ({"tokenizer.ggml.model": (3, T.UINT32)}, r"tokenizer\.ggml\.model"),
        "scores_short": ({"tokenizer.ggml.model": ("llama", T.STRING),
                          "tokenizer.ggml.scores": ([0.5], T.ARRAY, T.FLOAT32)}, r"scores"),
        "template_an_int": ({"tokenizer.chat_template": (5, T.UINT32)}, r"chat_template"),
    }
    cases = [{"name": name, "path": _vocab_gguf(tmp_path / f"{name}.gguf", **over), "calls": ["tokenizer"],
              "match": match} for name, (over, match) in bad.items()]
    check_all_rejected(cases)
    # Special ids outside the vocabulary are ignored (as llama.cpp does), not fatal.
    ok = [{"name": "eos_2^40", "calls": ["tokenizer"],
           "path": _vocab_gguf(tmp_path / "eos.gguf", **{"tokenizer.ggml.eos_token_id": (1 << 40, T.UINT64)})}]
    assert run_cases(ok)[("eos_2^40", "tokenizer")][0] == "ok"
