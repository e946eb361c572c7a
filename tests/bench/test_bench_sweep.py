"""fastllm.bench sweep and compare on a tiny random-weight model (CPU)."""
import json

import pytest
import torch

from fastllm.bench import compare, models, sweep
from fastllm.bench.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(str(path))


@pytest.fixture(scope="module")
def checkpoint():
    from checkpoints import cached_checkpoint
    return cached_checkpoint("llama")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", "--model", str(checkpoint), "--device", "cpu", "--out", str(out),
                 "--concurrency", "1,2,4", "--gpu-memory-utilization", "0.8,1.5",
                 "--max-num-seqs", "1,4", "--num-prompts", "4", "--input-len", "8",
                 "--output-len", "4", "--stats"]) == 0
    return out


def test_sweep_writes_json_and_pngs_that_parse(sweep_dir):
    report = json.loads((sweep_dir / "sweep.json").read_text())
    assert set(report["sweeps"]) == {"batching", "memory", "max-num-seqs"}
    for name in report["sweeps"]:
        image = _read_png(sweep_dir / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert report["plots"][name].endswith(f"{name}.png")


def test_batching_points_count_every_generated_token(sweep_dir):
    batching = json.loads((sweep_dir / "sweep.json").read_text())["sweeps"]["batching"]
    assert [p["concurrency"] for p in batching["points"]] == [1, 2, 4]
    for p in batching["points"]:
        assert p["status"] == "ok"
        assert p["num_requests"] == p["concurrency"]
        assert p["output_tokens"] == p["concurrency"] * 4          # ignore_eos: exactly output_len
        assert p["throughput_tok_s"] == pytest.approx(p["output_tokens"] / p["elapsed_s"])
        assert p["preemptions"] == 0
        # Peak blocks: each request holds ceil((8 + 4 - 1) / 16) = 1 block at its fullest.
        assert p["kv_blocks_peak"] == p["concurrency"]
        assert p["kv"]["num_seqs"] == p["concurrency"]
    assert batching["bound"] in ("compute", "memory")


def test_memory_sweep_reports_a_rejected_setting_instead_of_crashing(sweep_dir):
    points = json.loads((sweep_dir / "sweep.json").read_text())["sweeps"]["memory"]["points"]
    assert [p["gpu_memory_utilization"] for p in points] == [0.8, 1.5]
    assert points[0]["status"] == "ok" and points[0]["output_tokens"] == 16
    assert points[1]["status"] == "rejected" and "gpu_memory_utilization" in points[1]["error"]


def test_max_num_seqs_sweep_bounds_the_batch(sweep_dir):
    points = json.loads((sweep_dir / "sweep.json").read_text())["sweeps"]["max-num-seqs"]["points"]
    one, four = points
    assert one["max_num_seqs"] == 1 and four["max_num_seqs"] == 4
    assert one["kv_blocks_peak"] == 1 and four["kv_blocks_peak"] == 4
    # One sequence at a time: 4 prompts x (1 prefill + 3 decode steps); four at once: 4 steps.
    assert one["steps"] == 16 and four["steps"] == 4


def test_sweep_records_preemptions_when_the_cache_is_small(tmp_path):
    # 4 requests of 16 prompt tokens fill 4 blocks of 16; the first decode token needs a
    # second block each, so with 4 blocks in all the scheduler must preempt.
    report = sweep.run(_args(tmp_path, "--random-weights", "--sweeps", "max-num-seqs",
                             "--max-num-seqs", "4", "--num-kv-blocks", "4", "--num-prompts", "4",
                             "--input-len", "16", "--output-len", "8"))
    (p,) = report["sweeps"]["max-num-seqs"]["points"]
    assert p["status"] == "ok" and p["preemptions"] > 0
    assert p["output_tokens"] == 32 and p["kv_blocks_total"] == 4


def test_sweep_cache_too_small_for_one_request_is_rejected_not_raised(tmp_path):
    report = sweep.run(_args(tmp_path, "--random-weights", "--sweeps", "batching",
                             "--concurrency", "1,2", "--num-kv-blocks", "1",
                             "--input-len", "16", "--output-len", "8"))
    points = report["sweeps"]["batching"]["points"]
    assert [p["status"] for p in points] == ["rejected", "rejected"]
    assert "KV blocks" in points[0]["error"]
    assert (tmp_path / "batching.png").exists()


def test_out_of_memory_becomes_a_result(tmp_path, monkeypatch):
    real = models.make_engine

    def make_engine(loaded, cfg):
        if cfg.max_num_seqs == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loaded, cfg)
    monkeypatch.setattr(models, "make_engine", make_engine)
    report = sweep.run(_args(tmp_path, "--random-weights", "--sweeps", "max-num-seqs",
                             "--max-num-seqs", "2,8", "--num-prompts", "2", "--input-len", "4",
                             "--output-len", "2"))
    ok, oom = report["sweeps"]["max-num-seqs"]["points"]
    assert ok["status"] == "ok" and oom["status"] == "oom"
    assert "out of memory" in oom["error"]
    assert report["sweeps"]["max-num-seqs"]["best"] == 2


def test_a_bug_is_not_swallowed(tmp_path, monkeypatch):
    def make_engine(loaded, cfg):
        raise TypeError("a real bug")
    monkeypatch.setattr(models, "make_engine", make_engine)
    with pytest.raises(TypeError, match="real bug"):
        sweep.run(_args(tmp_path, "--random-weights", "--sweeps", "max-num-seqs",
                        "--max-num-seqs", "2", "--num-prompts", "1"))


def test_sweep_profile_writes_a_trace(tmp_path):
    sweep.run(_args(tmp_path, "--random-weights", "--sweeps", "max-num-seqs", "--max-num-seqs", "2",
                    "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                    "--profile", str(tmp_path / "prof")))
    (trace,) = (tmp_path / "prof").glob("*.pt.trace.json")
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.parametrize("xs, tps, expected", [
    ([1, 2, 4, 8], [10, 19, 20, 20.5], 2),          # +5% then +2.5%: flat after 2
    ([1, 2, 4, 8], [10, 20, 40, 80], None),         # still doubling: not saturated
    ([1, 2, 4, 8], [10, 20, 18, 40], None),         # a dip, then growth again
    ([1, 2, 4, 8], [10, 30, 31, 29], 2),
    ([64], [5.0], None),
])
def test_find_saturation(xs, tps, expected):
    result = sweep.find_saturation(xs, tps, min_gain=0.10)
    assert result["saturation_x"] == expected
    assert result["bound"] == ("compute" if expected is not None else "memory")


def test_find_saturation_checks_lengths():
    with pytest.raises(ValueError, match="differ"):
        sweep.find_saturation([1, 2], [1.0])


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    assert main(["sweep", "--random-weights", "--out", str(tmp_path), "--concurrency", "1,x"]) == 2
    assert "--concurrency: 'x'" in capsys.readouterr().err
    assert main(["sweep", "--random-weights", "nope", "--out", str(tmp_path)]) == 2
    assert "--random-weights 'nope'" in capsys.readouterr().err
    assert main(["sweep", "--random-weights", "--out", str(tmp_path), "--sweeps", "fast"]) == 2
    assert "--sweeps" in capsys.readouterr().err


# -- compare -------------------------------------------------------------------------------

A_DOC = {"throughput": 100.0, "latency_ms": 40, "idle": 0, "both_zero": 0, "ok": True,
         "results": [{"label": "gemm 8x8x8", "value": 2.0}, {"label": "copy", "value": 5.0}],
         "points": [{"tok_s": 10.0}, {"tok_s": 20.0}], "only_in_a": 1}
B_DOC = {"throughput": 150.0, "latency_ms": 30, "idle": 7, "both_zero": 0, "ok": False,
         "results": [{"label": "copy", "value": 4.0}, {"label": "gemm 8x8x8", "value": 3.0}],
         "points": [{"tok_s": 25.0}, {"tok_s": 30.0}], "only_in_b": "text", "new": 2.5}


def test_compare_ratios_by_hand():
    result = compare.compare(A_DOC, B_DOC)
    ratios = {r["metric"]: r["ratio"] for r in result["rows"]}
    assert ratios == {
        "throughput": 1.5, "latency_ms": 0.75, "idle": None, "both_zero": 1.0,
        "results[gemm 8x8x8].value": 1.5,    # matched by label, not position
        "results[copy].value": 0.8,
        "points[0].tok_s": 2.5, "points[1].tok_s": 1.5,
    }
    assert result["only_a"] == ["only_in_a"] and result["only_b"] == ["new"]


def test_compare_cli_prints_the_table(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(A_DOC))
    b.write_text(json.dumps(B_DOC))
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "cmp.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines if line and not line.startswith("-")}
    assert row["throughput"] == ["100", "150", "1.500x"]
    assert row["latency_ms"] == ["40", "30", "0.750x"]
    assert row["idle"] == ["0", "7", "n/a"]
    assert row["results[copy].value"] == ["5", "4", "0.800x"]
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["rows"][0] == {"metric": "throughput", "a": 100.0, "b": 150.0, "ratio": 1.5}


def test_compare_same_sweep_is_all_ones(sweep_dir, capsys):
    path = str(sweep_dir / "sweep.json")
    assert main(["compare", path, path]) == 0
    result = compare.compare(*(json.loads((sweep_dir / "sweep.json").read_text()),) * 2)
    assert result["rows"] and all(r["ratio"] == 1.0 for r in result["rows"])
    assert "sweeps.batching.points[0].throughput_tok_s" in capsys.readouterr().out


def test_compare_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _args(out, *argv):
    import argparse
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(["--out", str(out), *argv])


def test_sweep_and_throughput_share_one_engine_loop(monkeypatch):
    """sweep.run_requests is throughput.run_batch plus KV tracking: same requests, same
    tokens; only finished outputs are built (FINAL_ONLY)."""
    from fastllm.bench import throughput
    loaded = models.load(random_weights="tiny", device="cpu", dtype="float32")
    prompts = sweep.random_prompts(3, 6, loaded.config.vocab_size, seed=1)
    from fastllm.config import EngineConfig
    engine = models.make_engine(loaded, EngineConfig(block_size=4, num_kv_blocks=32))
    calls = []
    run_batch = throughput.run_batch
    monkeypatch.setattr(sweep, "run_batch", lambda *a, **k: calls.append(a[1]) or run_batch(*a, **k))
    built = []
    make_output = engine.output_processor.make_output
    monkeypatch.setattr(engine.output_processor, "make_output",
                        lambda g: built.append(g.request_id) or make_output(g))
    point = sweep.run_requests(engine, prompts, 5, "p")
    assert calls == [prompts] and len(built) == 3
    assert point["output_tokens"] == 15 and point["kv_blocks_peak"] > 0
    token_ids, _ = throughput.fastllm_generate(engine, prompts, [5] * 3, tag="t")
    outs, _ = throughput.run_batch(engine, prompts, [5] * 3, tag="u")
    assert [list(o.outputs[0].token_ids) for o in outs] == token_ids


def test_sweep_enforce_eager_flag_reaches_every_engine(tmp_path, monkeypatch):
    configs = []

    class Stop(Exception):
        pass

    def capture(loaded, cfg):
        configs.append(cfg)
        raise Stop
    monkeypatch.setattr(sweep.models, "make_engine", capture)
    for argv, eager in (([], False), (["--enforce-eager"], True)):
        with pytest.raises(Stop):
            sweep.run(_args(tmp_path / "out", "--random-weights", "--device", "cpu",
                            "--sweeps", "batching", *argv))
        assert configs[-1].enforce_eager is eager
