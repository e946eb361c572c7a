"""`python -m fastllm.generate` over a table of user mistakes: exit status 2, one line on
stderr naming the mistake, no traceback (that is --debug's); internal errors exit 1."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import cached_checkpoint
from fastllm.generate import main

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = str(cached_checkpoint("llama"))
    (root / "notes.txt").write_text("not a model")
    evil = struct.pack("<4sIQQQ", b"GGUF", 3, 0, 1, 1) + b"a" + struct.pack("<IIQ", 9, 0, 1 << 62)
    (root / "evil.gguf").write_bytes(evil[:68].ljust(68, b"\0"))
    (root / "empty_dir").mkdir()
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    no_template = root / "no_template"
    shutil.copytree(ckpt, no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {"ckpt": ckpt, "root": str(root), "no_template": str(no_template)}


FAST = ["--device", "cpu", "--num-kv-blocks", "16", "--max-tokens", "2"]

# (argv after substitution, a piece of the one stderr line)
BAD = [
    (["--model", "{root}/missing", "--prompt", "x"], "does not exist"),
    (["--model", "{root}/notes.txt", "--prompt", "x"], "not a GGUF file"),
    (["--model", "{root}/evil.gguf", "--prompt", "x"], "corrupt or unreadable GGUF"),
    (["--model", "{root}/empty_dir", "--prompt", "x"], "config.json"),
    (["--model", "{ckpt}", "--prompts-file", "{root}/latin1.txt"], "not UTF-8"),
    (["--model", "{ckpt}", "--prompts-file", "{root}/missing.txt"], "No such file"),
    (["--model", "{ckpt}", "--prompts-file", "{root}"], "Is a directory"),
    (["--model", "{ckpt}", "--prompt", "x", "--swap-space", "1e6"], "swap_space"),
    (["--model", "{ckpt}", "--prompt", "x", "--swap-space", "nan"], "swap_space"),
    (["--model", "{ckpt}", "--prompt", "x", "--swap-space", "inf"], "swap_space"),
    (["--model", "{ckpt}", "--prompt", "x", "--swap-space", "-1"], "swap_space"),
    (["--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--model", "{ckpt}", "--prompt", "x", "--temperature", "inf"], "temperature"),
    (["--model", "{ckpt}", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["--model", "{ckpt}", "--prompt", "x", "--top-p", "nan"], "top_p"),
    (["--model", "{ckpt}", "--prompt", "x", "--top-k", "-5"], "top_k"),
    (["--model", "{ckpt}", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["--model", "{ckpt}", "--prompt", "x", "--block-size", "0"], "block_size"),
    (["--model", "{ckpt}", "--prompt", "x", "--max-num-seqs", "0"], "max_num_seqs"),
    (["--model", "{ckpt}", "--prompt", "x", "--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
    (["--model", "{ckpt}", "--prompt", "x", "--seed", str(2**70)], "seed"),
    (["--model", "{ckpt}", "--prompt", "x", "--device", "tpu"], "device"),
    (["--model", "{ckpt}", "--prompt", "x", "--dtype", "int8"], "dtype"),
    (["--model", "{ckpt}", "--prompt", "x", "--max-model-len", "100000"], "max_model_len"),
    (["--model", "{no_template}", "--prompt", "x", "--chat"], "chat_template"),
    (["--model", "{ckpt}", "--prompt", "x", "--frobnicate"], "unrecognized arguments"),
    (["--model", "{ckpt}", "--prompt", "x", "--max-tokens", "abc"], "invalid int value"),
    (["--model", "{ckpt}"], "give at least one --prompt"),
]


def _argv(template, files):
    argv = [a.format(**files) for a in template]
    # The fast flags go first so the case's own value of a flag wins.
    return FAST + argv if "--frobnicate" not in argv else argv


def _run_main(argv):
    try:
        return main(argv)
    except SystemExit as e:             # argparse's usage errors
        return e.code


@pytest.mark.parametrize("template, expected", BAD, ids=[" ".join(t[2:]) or "no-prompt" for t, _ in BAD])
def test_user_mistakes_exit_2_with_one_line(template, expected, files, capsys):
    rc = _run_main(_argv(template, files))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_debug_shows_the_error_itself(files):
    with pytest.raises(ValueError, match="swap_space"):
        main(FAST + ["--model", files["ckpt"], "--prompt", "x", "--swap-space", "1e6", "--debug"])


def test_internal_errors_exit_1_with_one_line(monkeypatch, capsys):
    import fastllm.llm

    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(fastllm.llm, "LLM", broken)
    assert main(["--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--prompt", "x", "--device", "cpu", "--debug"])


def test_real_entry_point_prints_no_traceback(files):
    """The module run as users run it, on the mistakes the issue saw tracebacks for."""
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR, "HF_HUB_OFFLINE": "1"}
    for template, expected in (BAD[4], BAD[7], BAD[2]):
        proc = subprocess.run([sys.executable, "-m", "fastllm.generate", *_argv(template, files)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and expected in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
