"""`python -m fastllm.generate` on a tiny checkpoint directory (with tokenizer.json)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams
from fastllm.generate import main

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


@pytest.fixture(scope="module")
def path():
    return str(cached_checkpoint("llama"))


@pytest.fixture(scope="module")
def expected(path):
    llm = LLM(path, device="cpu", num_kv_blocks=32)
    outs = llm.generate(["The capital of France is", "Hello"],
                        SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_single_prompt_streams_greedy_text(path, expected, capsys):
    rc = main(["--model", path, "--prompt", "The capital of France is", "--max-tokens", "6",
               "--device", "cpu", "--num-kv-blocks", "32", "--stats"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is" + expected[0] + "\n")
    assert "tokens/s" in out
    assert "prefix cache hit rate" in out and "KV blocks" in out


def test_several_prompts_from_file(path, expected, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nHello\n")
    rc = main(["--model", path, "--prompts-file", str(prompts), "--max-tokens", "6",
               "--temperature", "0", "--device", "cpu", "--no-prefix-caching",
               "--max-num-seqs", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "=== [0] The capital of France is\n" + expected[0] + "\n" in out
    assert "=== [1] Hello\n" + expected[1] + "\n" in out
    assert "=== [2]" not in out


def test_chat_flag_and_errors(path, capsys):
    assert main(["--model", path, "--prompt", "Hi", "--chat", "--max-tokens", "3",
                 "--device", "cpu", "--num-kv-blocks", "32"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--model", path])                        # no prompt
    assert e.value.code == 2
    assert main(["--model", os.path.join(path, "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point(path, expected):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastllm.generate", "--model", path,
                           "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0",
                           "--device", "cpu", "--num-kv-blocks", "32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello" + expected[1])


def test_cli_sampling_params_go_through_llm_defaults(path, monkeypatch):
    """One mapping of generation_config.json (LLM.default_sampling_params); the CLI adds
    its flags on top and falls back to greedy / 128 tokens only where the checkpoint is silent."""
    from fastllm.generate import build_parser, sampling_params
    llm = LLM(path, device="cpu", num_kv_blocks=8)
    config = llm.llm_engine.model_config
    parse = build_parser().parse_args
    monkeypatch.setattr(config, "generation_defaults", {})
    sp = sampling_params(parse(["--prompt", "x"]), llm)
    assert (sp.temperature, sp.max_tokens, sp.top_p) == (0.0, 128, 1.0)
    assert llm.default_sampling_params() == SamplingParams()          # vLLM's own defaults
    monkeypatch.setattr(config, "generation_defaults",
                        {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 40, "repetition_penalty": 1.1})
    sp = sampling_params(parse(["--prompt", "x"]), llm)
    assert sp == llm.default_sampling_params() == llm.get_default_sampling_params()
    assert (sp.temperature, sp.top_p, sp.max_tokens, sp.repetition_penalty) == (0.7, 0.9, 40, 1.1)
    sp = sampling_params(parse(["--prompt", "x", "--temperature", "0.3", "--max-tokens", "5"]), llm)
    assert (sp.temperature, sp.top_p, sp.max_tokens) == (0.3, 0.9, 5)
    assert llm.default_sampling_params(max_tokens=3).max_tokens == 3


def test_enforce_eager_flag_reaches_the_engine(monkeypatch, capsys):
    import fastllm.llm
    seen = []

    def fake_llm(model, **kwargs):
        seen.append(kwargs)
        raise ValueError("stop here")
    monkeypatch.setattr(fastllm.llm, "LLM", fake_llm)
    assert main(["--prompt", "x", "--device", "cpu"]) == 2
    assert main(["--prompt", "x", "--device", "cpu", "--enforce-eager"]) == 2
    assert [kw["enforce_eager"] for kw in seen] == [False, True]
    assert "stop here" in capsys.readouterr().err
