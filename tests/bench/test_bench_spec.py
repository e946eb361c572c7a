"""`python -m fastllm.bench spec` on a tiny random checkpoint: every method gives the
same greedy tokens as no speculation on both workloads and batch sizes, the target as
its own draft accepts (nearly) everything, and the JSON report carries each row."""
import argparse
import json

from checkpoints import cached_checkpoint
from fastllm.bench import spec


def test_bench_spec_runs_and_agrees(tmp_path):
    parser = argparse.ArgumentParser()
    spec.add_arguments(parser)
    out = tmp_path / "spec.json"
    args = parser.parse_args(["--model", str(cached_checkpoint("llama")), "--device", "cpu",
                              "--dtype", "float32", "--batch-sizes", "1,2", "--output-len", "8",
                              "--batch1-requests", "1", "--num-speculative-tokens", "3",
                              "--json", str(out)])
    report = spec.run(args)
    rows = report["results"]
    assert {(r["method"], r["workload"], r["batch"]) for r in rows} == {
        (m, w, b) for m in ("none", "ngram", "draft_model") for w in ("repetitive", "random")
        for b in (1, 2)}
    for r in rows:
        assert r["same_tokens"] is True, r
        assert r["output_tokens"] == 8 * r["batch"]
        assert r["speedup"] is not None and r["speedup"] > 0
    drafts = [r for r in rows if r["method"] == "draft_model"]
    assert all(r["acceptance_rate"] > 0.9 for r in drafts)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(rows))
