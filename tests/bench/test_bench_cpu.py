"""`python -m fastllm.bench cpu`: runs on a tiny GGUF, reports every workload, and compares
greedy tokens (the quantized-as-stored engine against the dequantized one)."""
import json

import pytest

from checkpoints import write_checkpoint, write_gguf
from fastllm.bench import cpu
from fastllm.bench.__main__ import main


def test_agreement_counts_equal_prompts_and_the_common_prefix():
    assert cpu.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == "1/2 prompts equal (mean 2.0/3 tokens)"
    assert cpu.agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == "0/1 prompts equal (mean 1.0/3 tokens)"
    assert cpu.agreement([], []) == "0/0 prompts equal (mean 0.0/0 tokens)"


def test_agreements_pair_each_engine_with_its_peer():
    """Every engine against fastllm-f32; llama.cpp against fastllm on its file, and
    llama.cpp-fa (flash attention) against llama.cpp itself."""
    results = {"fastllm-f32": {"tokens": [[1, 2]]}, "fastllm-gguf": {"tokens": [[1, 3]]},
               "llama.cpp": {"tokens": [[1, 3]]}, "llama.cpp-fa": {"tokens": [[2, 3]]}}
    cpu.add_agreements(results)
    assert results["llama.cpp"]["greedy_agreement_vs_fastllm_gguf"] == "1/1 prompts equal (mean 2.0/2 tokens)"
    assert results["llama.cpp-fa"]["greedy_agreement_vs_llama.cpp"] == "0/1 prompts equal (mean 0.0/2 tokens)"
    assert results["fastllm-gguf"]["greedy_agreement_vs_fastllm_f32"] == "0/1 prompts equal (mean 1.0/2 tokens)"
    assert "greedy_agreement_vs_llama.cpp" not in results["fastllm-gguf"]


def test_bench_cpu_runs_on_a_gguf(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    hf = write_checkpoint(tmp_path / "hf", "llama", seed=2)
    gguf = write_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    # The test converter writes no vocabulary into the GGUF: take the checkpoint's tokenizer.
    from fastllm.tokenizer import Tokenizer
    load_tokenizer = Tokenizer.from_pretrained
    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(lambda path, **kw: load_tokenizer(hf, **kw)))
    # fp32 activations (not llama.cpp's int8 rounding): the quantized engine's math is then
    # the dequantized one's.
    monkeypatch.setenv("FASTLLM_CPU_INT8_ACTIVATIONS", "0")
    out = tmp_path / "r.json"
    assert main(["cpu", "--model", str(gguf), "--threads", "1", "--engines", "fastllm-gguf,fastllm-f32",
                 "--decode-tokens", "4", "--prefill-len", "24", "--batch", "3", "--batch-len", "5",
                 "--agreement-prompts", "3", "--clock", "cpu", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for name in ("fastllm-gguf", "fastllm-f32"):
        r = results[name]
        assert r["decode_ms_per_token"] > 0 and r["prefill_tok_s"] > 0 and r["throughput_out_tok_s"] > 0
        assert [len(t) for t in r["tokens"]] == [4, 4, 4]
    # Same Q8_0 values, fp32 math both ways: the greedy tokens agree.
    assert results["fastllm-gguf"]["greedy_agreement_vs_fastllm_f32"] == "3/3 prompts equal (mean 4.0/4 tokens)"
    assert "| fastllm-gguf |" in capsys.readouterr().out


def test_bench_cpu_rejects_unknown_engine(tmp_path, capsys):
    pytest.importorskip("gguf")
    gguf = write_gguf(write_checkpoint(tmp_path / "hf", "llama"), tmp_path / "m.gguf")
    assert main(["cpu", "--model", str(gguf), "--engines", "vllm", "--skip-throughput"]) == 2
    assert "unknown engine 'vllm'" in capsys.readouterr().err


def test_bench_cpu_rounds_and_derived_files(tmp_path, capsys, monkeypatch):
    # --rounds 2 keeps the engines loaded and measures them round-robin; the F32 and
    # Q4_K_M files come from llama.cpp's quantizer into the cache (not the model's folder).
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from fastllm.bench import cpu_files
    monkeypatch.setenv("FASTLLM_CACHE", str(tmp_path / "cache"))
    hf = write_checkpoint(tmp_path / "hf", "llama", seed=3)
    gguf = write_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    from fastllm.tokenizer import Tokenizer
    load_tokenizer = Tokenizer.from_pretrained
    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(lambda path, **kw: load_tokenizer(hf, **kw)))
    out = tmp_path / "r.json"
    assert main(["cpu", "--model", str(gguf), "--threads", "1", "--engines", "fastllm-f32,fastllm-q4km",
                 "--decode-tokens", "4", "--prefill-len", "24", "--skip-throughput", "--rounds", "2",
                 "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fastllm-f32", "fastllm-q4km"}
    assert all(r["decode_ms_per_token"] > 0 and len(r["tokens"]) == 8 for r in results.values())
    f32 = cpu_files.derived_path(str(gguf), "F32")
    assert f32.exists() and cpu_files.derived_path(str(gguf), "Q4_K_M").exists()
    assert f32.parent == tmp_path / "cache" / "bench"
    # The F32 file holds the source's dequantized values: kept as stored (F32 rows), the
    # model's greedy tokens equal the source dequantized at load.
    from fastllm import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = [LLM(str(p), device="cpu", quantization=q, enable_prefix_caching=False)
            .generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
            for p, q in ((f32, "gguf"), (gguf, None))]
    assert runs[0] == runs[1]


def test_peer_process_runs_transformers_in_a_child_with_its_own_openmp_setting(tmp_path, monkeypatch):
    """A peer engine (here transformers) runs in its own process, under the OpenMP wait
    policy the bench started with (not fastllm's PASSIVE), and answers like the in-process
    engine; closing it leaves no process behind."""
    pytest.importorskip("gguf")
    from fastllm import openmp_env
    from fastllm.bench.cpu_peer import PeerProcess
    hf = write_checkpoint(tmp_path / "hf", "llama", seed=4)
    gguf = write_gguf(hf, tmp_path / "m.gguf", "F32")
    # As after `import fastllm` in a process started without the variable.
    monkeypatch.setattr(openmp_env, "ORIGINAL_WAIT_POLICY", None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    peer = PeerProcess("hf-f32", str(gguf), 1)
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
        got = peer.generate(prompts, 5)
        want = cpu.HFEngine(str(gguf)).generate(prompts, 5)
        assert got == want and all(len(t) == 5 for t in got)
    finally:
        peer.close()
    assert peer.proc.poll() is not None
    assert peer.omp_wait_policy is None


def test_peer_process_reports_a_missing_engine_as_import_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from fastllm.bench.cpu_peer import PeerProcess
    gguf = write_gguf(write_checkpoint(tmp_path / "hf", "llama"), tmp_path / "m.gguf")
    # A child that cannot import llama_cpp: an empty module of that name that raises.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "llama_cpp.py").write_text("raise ImportError('no llama_cpp here')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{__import__('os').environ.get('PYTHONPATH', '')}")
    with pytest.raises(ImportError, match="no llama_cpp here"):
        PeerProcess("llama.cpp", str(gguf), 1)
