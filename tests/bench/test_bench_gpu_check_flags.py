"""The bench flags scripts/gpu_check.sh relies on, on CPU with tiny shapes: kernels --quick
(iteration counts), throughput --hf-num-prompts / --hf-timeout / the partial JSON written
before a slow baseline, and the decode-step bytes latency reports for the bandwidth bound
(hand-counted). No assertion is about speed (DESIGN §5)."""
import argparse
import json

import pytest
import torch

from fastllm.bench import kernels, latency, models, throughput
from fastllm.bench.__main__ import main as bench_main
from fastllm.config import ModelConfig


def run_bench(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


TINY = ["--random-weights", "tiny", "--device", "cpu"]


# -- kernels --quick -----------------------------------------------------------------------------

def test_kernels_quick_sets_the_iteration_counts_and_explicit_flags_win(tmp_path):
    out = tmp_path / "k.json"
    one_case = ["--device", "cpu", "--only", "decode_b4_ctx512", "--json", str(out)]
    assert bench_main(["kernels", "--quick", *one_case]) == 0
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    assert (doc["warmup"], doc["iters"]) == (kernels.QUICK_CPU_WARMUP, kernels.QUICK_CPU_ITERS)
    assert [k["name"] for k in doc["kernels"]] == ["decode_b4_ctx512"]
    assert doc["kernels"][0]["median_s"] > 0 and doc["kernels"][0]["rel_error"] < 1e-4

    assert bench_main(["kernels", "--quick", "--iters", "3", "--warmup", "1", *one_case]) == 0
    doc = json.loads(out.read_text())
    assert (doc["warmup"], doc["iters"], doc["quick"]) == (1, 3, True)

    assert bench_main(["kernels", *one_case]) == 0
    assert json.loads(out.read_text())["quick"] is False


# -- throughput: the baseline on the first N requests, partial JSON ------------------------------

def test_hf_num_prompts_runs_the_baseline_on_the_first_requests(tmp_path):
    out = tmp_path / "t.json"
    result = run_bench(throughput, [*TINY, "--num-prompts", "5", "--input-len", "6", "--output-len", "4",
                                    "--hf-modes", "static", "--hf-batch-size", "2",
                                    "--hf-num-prompts", "3", "--json", str(out)])
    doc = json.loads(out.read_text())
    fast, hf = doc["engines"]["fastllm"], doc["engines"]["hf_static"]
    assert fast["output_tokens"] == 5 * 4 and hf["output_tokens"] == 3 * 4
    assert hf["num_requests"] == 3 and doc["hf_num_prompts"] == 3 and doc["partial"] is False
    # float32 on the CPU: transformers' greedy tokens equal fastllm's on those 3 requests.
    assert result["token_ids"]["hf_static"] == result["token_ids"]["fastllm"][:3]
    assert doc["agreement"]["hf_static"]["identical_requests"] == 3
    assert doc["agreement"]["hf_static"]["num_requests"] == 3
    assert doc["ratios"]["fastllm/hf_static"]["requests_per_s"] == pytest.approx(
        fast["requests_per_s"] / hf["requests_per_s"])


@pytest.mark.parametrize("flag, value, message", [("--hf-num-prompts", "6", "hf-num-prompts"),
                                                  ("--hf-num-prompts", "0", "hf-num-prompts"),
                                                  ("--hf-timeout", "0", "hf-timeout")])
def test_bad_baseline_limits_are_usage_errors(flag, value, message, capsys):
    argv = ["throughput", *TINY, "--num-prompts", "5", "--input-len", "4", "--output-len", "2",
            "--hf-modes", "static", flag, value]
    assert bench_main(argv) == 2
    assert message in capsys.readouterr().err


def test_fastllm_figures_are_on_disk_before_the_baseline_runs(tmp_path, monkeypatch):
    # A slow baseline killed by gpu_check.sh's phase timeout must not take fastllm's
    # numbers with it: the JSON already holds them when the baseline starts.
    out = tmp_path / "t.json"
    seen = {}
    real_static = throughput.hf_static_generate

    def static_reading_the_file(*args, **kwargs):
        seen.update(json.loads(out.read_text()))
        return real_static(*args, **kwargs)
    monkeypatch.setattr(throughput, "hf_static_generate", static_reading_the_file)
    run_bench(throughput, [*TINY, "--num-prompts", "3", "--input-len", "4", "--output-len", "3",
                           "--hf-modes", "static", "--no-warmup", "--json", str(out)])
    assert seen["partial"] is True and list(seen["engines"]) == ["fastllm"]
    assert seen["engines"]["fastllm"]["output_tokens"] == 9 and seen["num_prompts"] == 3
    final = json.loads(out.read_text())
    assert final["partial"] is False and set(final["engines"]) == {"fastllm", "hf_static"}


def test_hf_timeout_reaches_continuous_batching(monkeypatch):
    calls = []

    def fake_continuous(model, prompts, output_lens, **kwargs):
        calls.append(kwargs)
        return [[0] * n for n in output_lens], 1.0
    monkeypatch.setattr(throughput, "hf_continuous_generate", fake_continuous)
    argv = [*TINY, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
            "--hf-modes", "continuous", "--no-warmup"]
    run_bench(throughput, [*argv, "--hf-timeout", "12.5"])
    run_bench(throughput, argv)
    assert calls == [{"timeout_s": 12.5}, {}]


# -- latency: what a decode step must read -------------------------------------------------------

def test_decode_step_bytes_hand_counted():
    # tiny: hidden 64, intermediate 128, 2 layers, 4 q / 2 kv heads of 16, vocab 512.
    # Per layer: qkv (4+2+2)*16 x 64 = 8192, o 64x64 = 4096, gate_up 256x64 = 16384,
    # down 64x128 = 8192, two norms 128 -> 36992; x2 layers + final norm 64 = 74048.
    # Embedding and lm_head 512x64 = 32768 each. float32: 4 bytes.
    layers_and_norm = 2 * 36992 + 64
    config = ModelConfig(architecture="LlamaForCausalLM", **models.RANDOM_PRESETS["tiny"])
    untied = models.random_model(config, torch.float32, torch.device("cpu"))
    got = latency.decode_step_bytes(untied, config, torch.float32)
    assert got == {"weight_bytes": (layers_and_norm + 2 * 32768) * 4,
                   "weight_bytes_read_per_step": (layers_and_norm + 32768) * 4,
                   # K and V, 2 layers, 2 kv heads, head_dim 16, 4 bytes
                   "kv_bytes_per_token": 2 * 2 * 2 * 16 * 4}
    tied_config = ModelConfig(architecture="LlamaForCausalLM",
                              **{**models.RANDOM_PRESETS["tiny"], "tie_word_embeddings": True})
    tied = models.random_model(tied_config, torch.bfloat16, torch.device("cpu"))
    got = latency.decode_step_bytes(tied, tied_config, torch.bfloat16)
    # The shared table is stored once and read once per step (as the lm_head).
    assert got["weight_bytes"] == got["weight_bytes_read_per_step"] == (layers_and_norm + 32768) * 2
    assert got["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2


def test_latency_json_carries_the_decode_bytes(tmp_path):
    out = tmp_path / "l.json"
    run_bench(latency, [*TINY, "--input-len", "4", "--output-len", "3", "--num-requests", "1",
                        "--concurrency", "1", "--num-load-requests", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["decode_bytes"]["weight_bytes_read_per_step"] == (2 * 36992 + 64 + 32768) * 4


def test_agreement_counts_requests_whose_first_16_tokens_match():
    from fastllm.bench.hf_baseline import agreement
    ref = [list(range(20)), list(range(20)), list(range(5))]
    got = [list(range(20)),                      # identical
           list(range(16)) + [99, 98, 97, 96],   # first 16 equal, then drifts
           [0, 1, 7, 3, 4]]                      # differs at token 2
    a = agreement(got, ref)
    assert a["identical_requests"] == 1
    assert a["first_16_identical_fraction"] == pytest.approx(2 / 3)
    assert a["mean_common_prefix_fraction"] == pytest.approx((1 + 16 / 20 + 2 / 5) / 3)
