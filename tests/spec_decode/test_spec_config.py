"""speculative_config validation (ValueError naming the field, from LLM / EngineConfig
and --speculative-config), requests that must not speculate (penalties, logprobs, a
seed) get exactly their non-speculative outputs, and the stats reach /metrics."""
import argparse
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import cached_checkpoint
from fastllm.config import EngineConfig
from fastllm.engine.arg_utils import add_engine_args, llm_kwargs
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams
from fastllm.serve.metrics import ServerMetrics
from fastllm.spec_decode import SpeculativeConfig

BAD = [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2,
      "prompt_lookup_min": 3}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/x"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown"),
    ("{not json", "JSON"),
    (["ngram"], "dict"),
]


@pytest.mark.parametrize("value,field", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_config_is_value_error(value, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(speculative_config=value)


def test_json_flag_and_dict_agree():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'])
    cfg = EngineConfig(speculative_config=llm_kwargs(args)["speculative_config"])
    assert cfg.speculative_config == SpeculativeConfig("ngram", 3, prompt_lookup_max=5, prompt_lookup_min=2)
    assert EngineConfig().speculative_config is None


def test_draft_vocab_must_match():
    target = cached_checkpoint("llama")
    other = cached_checkpoint("llama", vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        LLMEngine.from_pretrained(str(target), EngineConfig(max_model_len=64, speculative_config={
            "method": "draft_model", "model": str(other), "num_speculative_tokens": 2}),
            dtype="float32", device="cpu")


def _outputs(engine, requests):
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    return outs


def test_requests_that_cannot_speculate_run_plain():
    """Speculation is off for penalties, logprobs and seeded sampling (the request's
    outputs, logprobs included, equal the plain engine's); a greedy request beside
    them speculates (the prompt holds most ids, so 1-gram drafts exist)."""
    path = str(cached_checkpoint("llama"))
    prompt = list(range(3, 240))
    requests = {
        "penalty": (prompt, SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=12)),
        "logprobs": (prompt, SamplingParams(temperature=0, logprobs=2, max_tokens=12)),
        "seeded": (prompt, SamplingParams(temperature=0.9, seed=123, max_tokens=12)),
        "greedy": (prompt, SamplingParams(temperature=0, max_tokens=12)),
    }
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}

    def engine(**kw):
        return LLMEngine.from_pretrained(path, EngineConfig(max_model_len=256, **kw),
                                         dtype="float32", device="cpu")
    plain = _outputs(engine(), requests)
    spec_engine = engine(speculative_config=spec)
    fast = _outputs(spec_engine, requests)
    for rid in requests:
        a, b = plain[rid].outputs[0], fast[rid].outputs[0]
        assert b.token_ids == a.token_ids, rid
        # Logprobs: the same ids and ranks; values to float rounding (a speculating
        # neighbour changes the batch's shape, and the CPU GEMM's blocking with it).
        if a.logprobs is not None:
            assert [{t: lp.rank for t, lp in pos.items()} for pos in b.logprobs] == \
                [{t: lp.rank for t, lp in pos.items()} for pos in a.logprobs], rid
            for pa, pb in zip(a.logprobs, b.logprobs):
                for t in pa:
                    assert pb[t].logprob == pytest.approx(pa[t].logprob, abs=1e-4), rid
        drafted = fast[rid].metrics.num_spec_draft_tokens
        assert (drafted > 0) == (rid == "greedy"), rid
    # /metrics carries the engine's speculative counters and rates.
    stats = spec_engine.get_stats()
    text = ServerMetrics(types.SimpleNamespace(latest_stats=stats, num_unstarted=0)).render().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["fastllm:spec_decode_num_draft_tokens_total"] == stats.spec_num_draft_tokens > 0
    assert samples["fastllm:spec_decode_num_accepted_tokens_total"] == stats.spec_num_accepted_tokens
    assert samples["fastllm:spec_decode_acceptance_rate"] == pytest.approx(
        stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens)
    assert samples["fastllm:spec_decode_mean_accepted_length"] == pytest.approx(
        1 + stats.spec_num_accepted_tokens / stats.spec_num_verifications)
