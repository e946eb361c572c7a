"""Speculative sampling keeps the target model's distribution: on a tiny random model
(vocabulary 24), thousands of samples of the same prompt at temperature 0.8 with
top-k 10, and the output tokens at positions 1..2 (the k + 1 = 3 positions the
speculative step scores) are chi-square tested against their exact marginals under the
target, summed over every prefix in float64 with HF transformers. n-gram drafts (the
prompt holds every token, so a draft is always found) and a noisy draft model."""
import itertools

import pytest
import torch

from checkpoints import load_hf_model, write_checkpoint
from conftest import noisy_copy
from fastllm.config import EngineConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.model.loader import load_for_engine
from fastllm.sampling_params import SamplingParams
from stat_utils import SIGNIFICANCE, chi_square_pvalue

V, K, NUM_REQUESTS = 24, 2, 2000
SAMPLES_PER_REQUEST = 100
TEMPERATURE, TOP_K = 0.8, 10
PROMPT = list(range(V)) + [0, 1, 2]


def processed(logits: torch.Tensor) -> torch.Tensor:
    """The sampler's distribution, in float64: temperature, top-k (ties kept), softmax."""
    logits = logits.double() / TEMPERATURE
    kth = logits.topk(TOP_K, dim=-1).values[..., -1:]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)


def exact_marginals(hf, depth: int) -> list[torch.Tensor]:
    """[P(out_j = v)] for j = 0..depth: sum over every prefix of its probability."""
    marginals, prefixes, weights = [], [()], torch.ones(1, dtype=torch.float64)
    for _ in range(depth + 1):
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            dists = torch.cat([processed(hf(chunk).logits[:, -1]) for chunk in ids.split(2048)])
        joint = weights.unsqueeze(1) * dists                 # [prefixes, V]
        marginals.append(joint.sum(dim=0))
        prefixes = [p + (v,) for p in prefixes for v in range(V)]
        weights = joint.reshape(-1)
    return marginals


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny-vocab"), "llama", tokenizer=False,
                            vocab_size=V, seed=4)
    hf = load_hf_model(path, dtype=torch.float64)
    return path, exact_marginals(hf, K)


def sample_outputs(path, spec: dict, seed: int) -> tuple[torch.Tensor, object]:
    loaded = load_for_engine(str(path), dtype="float32", device="cpu")
    engine = LLMEngine(loaded.model, loaded.config, EngineConfig(
        max_model_len=64, max_num_seqs=NUM_REQUESTS, seed=seed, speculative_config=spec), None,
        device=loaded.device, dtype=loaded.dtype)
    # n samples per request: one prefill forks into n independent samples.
    sp = SamplingParams(n=SAMPLES_PER_REQUEST, temperature=TEMPERATURE, top_k=TOP_K,
                        max_tokens=K + 1, ignore_eos=True)
    for i in range(NUM_REQUESTS // SAMPLES_PER_REQUEST):
        engine.add_request(str(i), PROMPT, sp)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(c.token_ids for o in engine.step() if o.finished for c in o.outputs)
    return torch.tensor(outs), engine.get_stats()


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_first_k_positions_follow_target(tiny_case, method, tmp_path):
    path, marginals = tiny_case
    spec = {"method": method, "num_speculative_tokens": K}
    if method == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=2)
    else:
        spec["model"] = noisy_copy(path, tmp_path / "draft", 0.3)
    outs, stats = sample_outputs(path, spec, seed=11)
    assert outs.shape == (NUM_REQUESTS, K + 1)
    # Every request's first decode step verified drafts; some were accepted, some not.
    assert stats.spec_num_verifications >= NUM_REQUESTS
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    for j in range(1, K + 1):
        pvalue = chi_square_pvalue(torch.bincount(outs[:, j], minlength=V), marginals[j])
        assert pvalue > SIGNIFICANCE, f"{method}: output position {j}, chi-square p = {pvalue:.2e}"
