"""`python -m fastllm.bench structured` on a tiny checkpoint: both runs decode every
requested token (same work), and the JSON it writes holds the two rates and the cost."""
from __future__ import annotations

import json

import pytest

from checkpoints import cached_checkpoint
from fastllm.bench.__main__ import main


def test_bench_structured_runs_the_same_work_both_ways(tmp_path, capsys):
    out = tmp_path / "structured.json"
    rc = main(["structured", "--model", str(cached_checkpoint("llama")), "--device", "cpu",
               "--num-prompts", "3", "--output-len", "5", "--repeat", "1", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for name in ("free", "constrained"):
        assert result[name]["output_tokens"] == 15
        assert result[name]["output_tok_s"] > 0
    assert result["cost"] == pytest.approx(1 - result["constrained"]["output_tok_s"] / result["free"]["output_tok_s"])
    assert "structured-output cost" in capsys.readouterr().out


def test_bench_structured_refuses_bad_sizes(capsys):
    assert main(["structured", "--num-prompts", "0"]) == 2
    assert "--num-prompts" in capsys.readouterr().err
