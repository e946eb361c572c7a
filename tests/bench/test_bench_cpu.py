"""`python -m fastllm.bench cpu`: runs on a tiny GGUF, reports every workload, and compares
greedy tokens (the quantized-as-stored engine against the dequantized one)."""
import json

import pytest

from checkpoints import write_checkpoint, write_gguf
from fastllm.bench import cpu
from fastllm.bench.__main__ import main


def test_agreement_counts_the_common_prefix():
    assert cpu.agreement([1, 2, 3], [1, 2, 3]) == "3/3"
    assert cpu.agreement([1, 2, 3, 4], [1, 9, 3]) == "1/3"
    assert cpu.agreement([], [5]) == "0/0"


def test_bench_cpu_runs_on_a_gguf(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    hf = write_checkpoint(tmp_path / "hf", "llama", seed=2)
    gguf = write_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    # The test converter writes no vocabulary into the GGUF: take the checkpoint's tokenizer.
    from fastllm.tokenizer import Tokenizer
    load_tokenizer = Tokenizer.from_pretrained
    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(lambda path, **kw: load_tokenizer(hf, **kw)))
    out = tmp_path / "r.json"
    assert main(["cpu", "--model", str(gguf), "--threads", "1", "--engines", "fastllm-gguf,fastllm-f32",
                 "--decode-tokens", "4", "--prefill-len", "24", "--batch", "3", "--batch-len", "5",
                 "--clock", "cpu", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for name in ("fastllm-gguf", "fastllm-f32"):
        r = results[name]
        assert r["decode_ms_per_token"] > 0 and r["prefill_tok_s"] > 0 and r["throughput_out_tok_s"] > 0
        assert len(r["tokens"]) == 5
    # Same Q8_0 values, fp32 math both ways: the greedy tokens agree.
    assert results["fastllm-gguf"]["greedy_agreement_vs_fastllm_f32"] == "5/5"
    assert "| fastllm-gguf |" in capsys.readouterr().out


def test_bench_cpu_rejects_unknown_engine(tmp_path, capsys):
    pytest.importorskip("gguf")
    gguf = write_gguf(write_checkpoint(tmp_path / "hf", "llama"), tmp_path / "m.gguf")
    assert main(["cpu", "--model", str(gguf), "--engines", "vllm", "--skip-throughput"]) == 2
    assert "unknown engine 'vllm'" in capsys.readouterr().err
