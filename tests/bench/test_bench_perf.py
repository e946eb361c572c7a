"""`python -m fastllm.bench kernels|throughput|latency` on CPU with tiny shapes: the JSON
carries every metric, the byte/FLOP formulas match hand counts, a wrong kernel is refused
before timing, fastllm's greedy tokens equal transformers' on the same weights, and the
latency percentiles are ordered. No assertion is about speed (DESIGN §5)."""
import argparse
import importlib
import json
import math

import pytest

from checkpoints import cached_checkpoint
from fastllm.bench import kernels, latency, throughput
from fastllm.bench.__main__ import main as bench_main
from fastllm.bench.hf_baseline import HFUnavailable


def run_bench(name, argv):
    """What `python -m fastllm.bench NAME ARGV` runs, returning the result dict
    (token ids included) instead of an exit status."""
    module = importlib.import_module(f"fastllm.bench.{name}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def positive_metrics(d, path=""):
    """Every numeric value of a JSON tree that names a time, rate, size or ratio."""
    keys = ("_s", "_GBps", "_TFLOPs", "bandwidth", "tflops", "bytes", "flops", "vs_", "speedup",
            "tok_s", "per_s")
    for k, v in d.items():
        if isinstance(v, dict):
            yield from positive_metrics(v, f"{path}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and any(s in k for s in keys):
            yield f"{path}{k}", v


# -- kernels ---------------------------------------------------------------------------------

def test_paged_attention_bytes_hand_computed():
    # 2 seqs x 100 cached tokens, 1 query each, 4 q / 2 kv heads, head_dim 8, bf16, block 16:
    # K+V 2*2*100*2*8*2 = 12800; q+out 2*2*1*4*8*2 = 256; block-table entries 2*ceil(100/16)
    # = 14, seq_lens 2, query_start_loc 3 -> 19 int32 = 76.
    assert kernels.paged_attention_bytes(2, 100, 1, 4, 2, 8, 16, 2) == 12800 + 256 + 76
    # Prefill of 1 seq, 4 tokens, 2 of them new: query 0 sees 3 keys, query 1 sees 4 -> 7
    # pairs; 2 matmuls x 2 FLOPs per multiply-add x head_dim 1 x 1 head.
    assert kernels.paged_attention_flops(1, 4, 2, 1, 1) == 28
    assert kernels.paged_attention_flops(3, 5, 5, 2, 8) == 4 * 3 * 2 * 8 * 15
    assert kernels.softmax_bytes(10, 2) == 40
    with pytest.raises(ValueError, match="q_len"):
        kernels.paged_attention_bytes(1, 4, 5, 1, 1, 8, 16, 2)


def test_kernels_bench_cpu_json(tmp_path):
    out = tmp_path / "kernels.json"
    assert bench_main(["kernels", "--device", "cpu", "--iters", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["small"] is True and doc["dtype"] == "float32"
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["gemm_TFLOPs"] > 0
    by_name = {k["name"]: k for k in doc["kernels"]}
    assert [k["op"] for k in doc["kernels"]] == ["paged_attention"] * 4 + ["fused_softmax"] * 3
    assert set(by_name) == {c.name for c in kernels.CPU_ATTENTION + kernels.CPU_SOFTMAX}
    for k in doc["kernels"]:
        metrics = dict(positive_metrics(k))
        for key in ("median_s", "bytes", "bandwidth_GBps", "bw_vs_copy"):
            assert key in metrics, (k["name"], key)
        assert all(v > 0 for v in metrics.values()), (k["name"], metrics)
        assert k["bandwidth_GBps"] == pytest.approx(k["bytes"] / k["median_s"] / 1e9)
        assert k["bw_vs_copy"] == pytest.approx(k["bandwidth_GBps"] / doc["ceilings"]["copy_GBps"])
        assert k["rel_error"] <= 1e-4
        for peer in k["peers"].values():
            assert peer["speedup"] == pytest.approx(peer["median_s"] / k["median_s"])
            assert peer.get("matches_reference", True) is True
    for name in ("decode_b4_ctx512", "prefill_b2_128", "extend_b2_192+64"):
        k, s = by_name[name], by_name[name]["shape"]
        assert k["bytes"] == kernels.paged_attention_bytes(
            s["num_seqs"], s["seq_len"], s["q_len"], s["num_heads"], s["num_kv_heads"],
            s["head_dim"], s["block_size"], 4)
        assert set(k["peers"]) == {"sdpa_contiguous_gqa_expanded"}
    assert by_name["prefill_b2_128"]["tflops_vs_gemm"] > 0
    assert set(by_name["softmax_attn_h8_256"]["peers"]) == {"torch_softmax", "torch_scale_mask_softmax"}
    assert set(by_name["softmax_sampling_b4_v128k"]["peers"]) == {"torch_softmax", "torch_scale_softmax"}
    assert by_name["softmax_sampling_b4_v128k"]["shape"]["shape"] == [4, 128256]
    rowtemp = by_name["softmax_sampling_rowtemp_b4_v128k"]
    assert rowtemp["shape"]["row_temperature"] is True
    assert set(rowtemp["peers"]) == {"torch_softmax", "torch_div_softmax"}
    assert rowtemp["bytes"] == kernels.softmax_bytes(4 * 128256, 4)


def test_kernels_bench_refuses_a_wrong_kernel(monkeypatch):
    real = kernels.ops.paged_attention

    def off_by_a_bit(out, *args):
        real(out, *args)
        out.mul_(1.01)
    monkeypatch.setattr(kernels.ops, "paged_attention", off_by_a_bit)
    with pytest.raises(AssertionError, match="decode_b1_ctx2k.*reference"):
        kernels.run_kernels("cpu", only=["decode_b1_ctx2k"], iters=1)


def test_kernels_bench_bad_case_name_is_a_usage_error(capsys):
    assert bench_main(["kernels", "--device", "cpu", "--only", "nope"]) == 2
    assert "--only" in capsys.readouterr().err


def test_fused_op_bytes_hand_computed():
    shape = dict(hidden=8, intermediate=5, num_heads=3, num_kv_heads=1, head_dim=4)
    # rms_norm, 2 tokens, bf16: x 16 + out 16 + weight 8 = 40 elements.
    assert kernels.fused_op_bytes("rms_norm", 2, 2, **shape) == 40 * 2
    # fused add: x and residual in and out (64) + weight 8.
    assert kernels.fused_op_bytes("fused_add_rms_norm", 2, 2, **shape) == 72 * 2
    # silu_and_mul: [2, 10] in + [2, 5] out.
    assert kernels.fused_op_bytes("silu_and_mul", 2, 4, **shape) == 30 * 4
    # rotary: q+k 2 * 4 * 4 = 32 elements in and out (64) + cos, sin 2 * 2 * 2 = 8.
    assert kernels.fused_op_bytes("rotary_embedding", 2, 2, **shape) == 72 * 2
    with pytest.raises(ValueError, match="op"):
        kernels.fused_op_bytes("gelu", 2, 2, **shape)


def test_kernels_bench_fused_section_cpu():
    names = [c.name for c in kernels.CPU_FUSED]
    doc = kernels.run_kernels("cpu", only=names, iters=1, warmup=0)
    assert doc["kernels"] == []
    assert [k["name"] for k in doc["fused"]] == names
    assert {k["op"] for k in doc["fused"]} == set(kernels.FUSED_OPS)
    for k in doc["fused"]:
        s = k["shape"]
        assert k["bytes"] == kernels.fused_op_bytes(k["op"], s["num_tokens"], 4, **kernels.LLAMA3_8B)
        assert k["bandwidth_GBps"] == pytest.approx(k["bytes"] / k["median_s"] / 1e9)
        assert k["rel_error"] <= 1e-4
        chain = k["peers"]["torch_chain"]
        assert chain["matches_reference"] is True
        assert chain["speedup"] == pytest.approx(chain["median_s"] / k["median_s"])
    assert "fused op" in kernels.format_results(doc)


def test_kernels_bench_refuses_a_wrong_fused_kernel(monkeypatch):
    real = kernels.ops.silu_and_mul

    def off_by_a_bit(out, x):
        real(out, x)
        out.mul_(1.01)
    monkeypatch.setattr(kernels.ops, "silu_and_mul", off_by_a_bit)
    with pytest.raises(AssertionError, match="silu_and_mul_t16.*reference"):
        kernels.run_kernels("cpu", only=["silu_and_mul_t16"], iters=1)


# -- throughput --------------------------------------------------------------------------------

def check_throughput(result, doc, output_lens):
    fast, hf = doc["engines"]["fastllm"], doc["engines"]["hf_static"]
    assert fast["status"] == hf["status"] == "ok"
    for m in (fast, hf):
        assert m["output_tok_s"] > 0 and m["requests_per_s"] > 0
        assert m["output_tokens"] == sum(output_lens)
    assert doc["ratios"]["fastllm/hf_static"]["output_tok_s"] == pytest.approx(
        fast["output_tok_s"] / hf["output_tok_s"])
    assert doc["agreement"]["hf_static"]["identical_fraction"] == 1.0
    assert "token_ids" not in doc
    fast_ids, hf_ids = result["token_ids"]["fastllm"], result["token_ids"]["hf_static"]
    assert [len(t) for t in fast_ids] == output_lens
    assert fast_ids == hf_ids
    assert len({t for ids in fast_ids for t in ids}) > 1      # not a degenerate constant output


def test_throughput_random_weights_tiny_matches_hf_static(tmp_path):
    out = tmp_path / "throughput.json"
    argv = ["--random-weights", "--config", "tiny", "--device", "cpu", "--hf-modes", "static",
            "--num-prompts", "5", "--random-lengths", "--input-range", "3,20",
            "--output-range", "2,10", "--hf-batch-size", "3", "--seed", "7", "--json", str(out)]
    result = run_bench("throughput", argv)
    doc = json.loads(out.read_text())
    assert doc["model"] == "random:tiny" and doc["random_lengths"] is True
    _, output_lens = throughput.make_requests(5, 512, 7, input_range=(3, 20), output_range=(2, 10))
    assert len(set(output_lens)) > 1 and len(set(doc["input_len_range"])) > 1   # padding exercised
    check_throughput(result, doc, output_lens)


def test_throughput_checkpoint_matches_hf_static(tmp_path):
    # A real checkpoint directory (Llama 3.1 rope scaling, GQA): transformers reads its
    # config.json and shares fastllm's loaded weights.
    out = tmp_path / "throughput.json"
    argv = ["--model", str(cached_checkpoint("llama")), "--device", "cpu", "--hf-modes", "static",
            "--num-prompts", "4", "--input-len", "9", "--output-len", "12", "--json", str(out)]
    result = run_bench("throughput", argv)
    check_throughput(result, json.loads(out.read_text()), [12] * 4)


def test_throughput_unavailable_hf_baseline_is_a_note(monkeypatch):
    def unavailable(*args, **kwargs):
        raise HFUnavailable("no continuous batching here")
    monkeypatch.setattr(throughput, "hf_continuous_generate", unavailable)
    result = run_bench("throughput", ["--random-weights", "tiny", "--device", "cpu", "--num-prompts", "2",
                                      "--input-len", "4", "--output-len", "3",
                                      "--hf-modes", "continuous"])
    assert result["engines"]["hf_continuous"]["status"] == "skipped"
    assert result["engines"]["fastllm"]["output_tokens"] == 6
    assert result["ratios"] == {} and "no continuous batching here" in result["notes"][0]


def test_make_requests_lengths_and_errors():
    prompts, outs = throughput.make_requests(50, 100, 3, input_range=(2, 6), output_range=(1, 4))
    assert all(2 <= len(p) <= 6 for p in prompts) and all(1 <= n <= 4 for n in outs)
    assert all(0 <= t < 100 for p in prompts for t in p)
    assert throughput.make_requests(50, 100, 3, input_range=(2, 6), output_range=(1, 4)) == (prompts, outs)
    prompts, outs = throughput.make_requests(3, 100, 0, 5, 7)
    assert [len(p) for p in prompts] == [5] * 3 and outs == [7] * 3
    with pytest.raises(ValueError, match="input-range"):
        throughput.make_requests(2, 100, 0, input_range=(5, 2), output_range=(1, 2))
    with pytest.raises(ValueError, match="num-prompts"):
        throughput.make_requests(0, 100, 0, 5, 5)


def test_throughput_model_flags_are_checked(capsys):
    assert bench_main(["throughput", "--config", "tiny"]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert bench_main(["throughput", "--random-weights", "tiny", "--config", "llama3-8b"]) == 2
    assert "disagree" in capsys.readouterr().err


# -- latency -----------------------------------------------------------------------------------

def test_percentile_hand_computed():
    assert latency.percentile([4, 1, 3, 2], 50) == 2.5
    assert latency.percentile(list(range(101)), 99) == 99
    assert latency.percentile([5.0], 99) == 5.0
    assert latency.percentile([0, 10], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        latency.percentile([], 50)


def test_latency_bench_percentiles(tmp_path):
    out = tmp_path / "latency.json"
    result = run_bench("latency", ["--random-weights", "--config", "tiny", "--device", "cpu",
                                   "--input-len", "10", "--output-len", "5", "--num-requests", "3",
                                   "--concurrency", "3", "--num-load-requests", "7",
                                   "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["scenarios"] == json.loads(json.dumps(result["scenarios"]))
    one, load = doc["scenarios"]["batch1"], doc["scenarios"]["load"]
    assert one["max_in_flight"] == 1 and load["max_in_flight"] == 3
    for s, n in ((one, 3), (load, 7)):
        assert s["ttft"]["count"] == s["e2e"]["count"] == n
        assert s["itl"]["count"] == n * (5 - 1)
        for metric in ("ttft", "itl", "e2e"):
            stats = s[metric]
            assert 0 < stats["p50_s"] <= stats["p99_s"] <= stats["max_s"]
        assert s["ttft"]["max_s"] <= s["e2e"]["max_s"]
        assert s["output_tok_s"] == pytest.approx(n * 5 / s["elapsed_s"])
        assert math.isclose(s["decode_tok_s_per_request"], 1 / s["itl"]["mean_s"])


@pytest.mark.parametrize("name, runner", [("throughput", "run_throughput"), ("latency", "run_latency")])
def test_enforce_eager_flag_reaches_the_engine_config(name, runner, monkeypatch):
    module = importlib.import_module(f"fastllm.bench.{name}")
    configs = []

    class Stop(Exception):
        pass

    def capture(loaded, *args, **kwargs):
        configs.append(next(a for a in args if type(a).__name__ == "EngineConfig"))
        raise Stop
    monkeypatch.setattr(module, runner, capture)
    for argv, eager in (([], False), (["--enforce-eager"], True)):
        with pytest.raises(Stop):
            run_bench(name, ["--random-weights", "tiny", "--device", "cpu", *argv])
        assert configs[-1].enforce_eager is eager
