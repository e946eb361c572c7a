"""Limits a server needs (issue 11): engine settings and per-request checks fail with a
ValueError naming the field, for that request only, and leave the engine usable."""
import math

import pytest

from checkpoints import cached_checkpoint, run_all
from fastllm.config import MAX_SWAP_FRACTION, EngineConfig, total_ram_bytes
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(str(cached_checkpoint("llama")),
                                     EngineConfig(max_model_len=64, num_kv_blocks=16),
                                     dtype="float32", device="cpu")


@pytest.mark.parametrize("field, value", [
    ("swap_space", 1e6), ("swap_space", float("inf")), ("swap_space", float("nan")),
    ("swap_space", -1), ("swap_space", True), ("swap_space", "4"),
    ("max_logprobs", -1), ("max_logprobs", 2.5), ("seed", 2**64), ("seed", "0"),
])
def test_engine_config_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"EngineConfig\.{field}\b"):
        EngineConfig(**{field: value})


def test_swap_space_limit_is_a_share_of_ram():
    total_gib = total_ram_bytes() / (1 << 30)
    assert EngineConfig(swap_space=math.floor(MAX_SWAP_FRACTION * total_gib * 0.99)).swap_space > 0
    with pytest.raises(ValueError, match=r"swap_space=.*RAM"):
        EngineConfig(swap_space=MAX_SWAP_FRACTION * total_gib * 1.01)


def test_logprobs_above_max_logprobs(engine):
    assert engine.config.max_logprobs == 20
    with pytest.raises(ValueError, match=r"logprobs=21 .*max_logprobs=20"):
        engine.add_request("lp", [5, 6], SamplingParams(logprobs=21, max_tokens=2))
    engine.add_request("lp20", [5, 6], SamplingParams(logprobs=20, max_tokens=2, temperature=0))
    out = run_all(engine)["lp20"].outputs[0]
    # 20 ranked entries (+ the sampled token when it is not among them).
    assert all(20 <= len(step) <= 21 for step in out.logprobs)


def test_bad_ids_fail_their_request_only(engine):
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    vocab = engine.model_config.vocab_size
    for bad in ([5, vocab], [-1], [5, 2.0], [True]):
        with pytest.raises(ValueError, match="prompt token id"):
            engine.add_request("bad", bad, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("bad", [5], SamplingParams(stop_token_ids=[vocab + 7]))
    outs = run_all(engine)
    assert list(outs) == ["good"] and len(outs["good"].outputs[0].token_ids) == 3
    assert engine.block_manager.num_used_blocks == 0


def test_abort_request_takes_what_add_request_takes(engine):
    # add_request str()s its id: an int id is aborted by the same int, alone or in a list.
    engine.add_request(7, [5, 6], SamplingParams(max_tokens=30))
    engine.add_request(8, [5, 6], SamplingParams(max_tokens=30))
    engine.add_request("nine", [5, 6], SamplingParams(max_tokens=30))
    engine.step()
    engine.abort_request(7)
    engine.abort_request((8, "nine"))
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
