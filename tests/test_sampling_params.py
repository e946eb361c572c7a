import pytest

from fastllm import SamplingParams
from fastllm.sampling_params import SamplingType


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5), ("max_tokens", 0), ("min_tokens", -1),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("logprobs", -1), ("seed", "7"), ("stop", ""),
    ("stop", ["ok", 3]), ("stop_token_ids", [-1]), ("temperature", True),
    # Limits a server needs (issue 11): bounded n, finite floats, 64-bit seeds, list types.
    ("n", 16385), ("n", 10**9), ("temperature", float("inf")), ("top_p", float("nan")),
    ("repetition_penalty", float("inf")), ("presence_penalty", float("-inf")),
    ("min_p", float("nan")), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.0),
    ("stop", 5), ("stop", {"a": 1}), ("stop_token_ids", 5), ("stop_token_ids", "12"),
    ("stop_token_ids", [2**64]), ("top_k", 2**64), ("max_tokens", 2**63), ("logprobs", 2**70),
    ("ignore_eos", "yes"), ("skip_special_tokens", None),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens .*max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_defaults_and_normalization():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, -1, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(top_k=0).top_k_enabled is False and SamplingParams(top_k=5).top_k_enabled


def test_greedy_switches_filters_off():
    p = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2, seed=1)
    assert p.is_greedy and p.sampling_type == SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy


def test_stop_token_ids_and_eos():
    p = SamplingParams(stop_token_ids=[7])
    p.update_from_tokenizer([2, 0])
    assert p.all_stop_token_ids == {7, 2, 0}
    q = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    q.update_from_tokenizer([2])
    assert q.all_stop_token_ids == {7}
    assert p.clone() == p and p.clone() is not p


def test_limits_are_inclusive():
    assert SamplingParams(n=16384).n == 16384
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(stop_token_ids=(4, 5)).stop_token_ids == [4, 5]
    assert SamplingParams(top_p=1e-50).top_p == 1e-50      # tiny but positive: allowed
