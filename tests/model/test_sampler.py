"""Sampler against hand-computed cases and float64 references."""
import pytest
import torch

from fastllm import SamplingParams
from fastllm.model.sampler import Sampler, SamplingBatch, apply_penalties, make_generator

V = 64


def _batch(params, prompts=None, outputs=None, eos=(), generators=None):
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    gens = generators if generators is not None else [make_generator(p, "cpu") for p in params]
    if eos:
        params = [p.clone() for p in params]
        for p in params:
            p.update_from_tokenizer(eos)     # what the engine does: all_stop_token_ids
    return SamplingBatch.from_requests(params, gens, prompts, outputs, "cpu", vocab_size=V)


def _sample_many(row_logits, params, draws=2000, seed=0):
    """`draws` independent samples of one logits row (the global generator, seeded)."""
    torch.manual_seed(seed)
    logits = row_logits.unsqueeze(0).repeat(draws, 1)
    return Sampler()(logits, _batch([params] * draws)).sampled_token_ids


@pytest.fixture
def row():
    torch.manual_seed(1234)
    return torch.randn(V, dtype=torch.float64) * 2.0


def test_top_k_never_emits_a_filtered_token(row):
    allowed = set(row.topk(5).indices.tolist())
    drawn = _sample_many(row.float(), SamplingParams(top_k=5, temperature=1.3))
    assert set(drawn.tolist()) <= allowed
    assert len(set(drawn.tolist())) == 5        # and it does sample, not pick one


def _margin_threshold(sorted_values, index):
    """A threshold halfway between two consecutive sorted values (robust to rounding)."""
    return float((sorted_values[index] + sorted_values[index + 1]) / 2)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_top_p_never_emits_a_filtered_token(row, temperature):
    probs = torch.softmax(row / temperature, dim=-1)          # float64 reference
    sorted_probs, order = probs.sort(descending=True)
    cumulative = sorted_probs.cumsum(0)
    top_p = _margin_threshold(cumulative, 6)                  # the nucleus is the top 8
    allowed = set(order[:8].tolist())
    drawn = _sample_many(row.float(), SamplingParams(top_p=top_p, temperature=temperature))
    assert set(drawn.tolist()) <= allowed
    assert len(set(drawn.tolist())) >= 4


def test_min_p_never_emits_a_filtered_token(row):
    probs = torch.softmax(row, dim=-1)
    relative = (probs / probs.max()).sort(descending=True).values
    min_p = _margin_threshold(relative, 9)                    # keeps the 10 most likely
    allowed = set(probs.topk(10).indices.tolist())
    drawn = _sample_many(row.float(), SamplingParams(min_p=min_p))
    assert set(drawn.tolist()) <= allowed
    assert len(set(drawn.tolist())) >= 5


def test_combined_filters(row):
    # top-k 12, then top-p over the renormalized 12, then min-p.
    params = SamplingParams(top_k=12, top_p=0.7, min_p=0.05, temperature=0.8)
    scaled = row / 0.8
    top12 = scaled.topk(12)
    p12 = torch.softmax(top12.values, dim=-1)
    keep = (p12.cumsum(0) - p12) < 0.7
    keep &= p12 >= 0.05 * p12.max()
    allowed = set(top12.indices[keep].tolist())
    drawn = _sample_many(row.float(), params)
    assert set(drawn.tolist()) <= allowed


def test_sampling_follows_the_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0, 1.5, 0.2], dtype=torch.float64)
    temperature, draws = 0.7, 20000
    expected = torch.softmax(logits / temperature, dim=-1)
    drawn = _sample_many(logits.float(), SamplingParams(temperature=temperature), draws=draws)
    freq = torch.bincount(drawn, minlength=8).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-3).all(), (freq, expected)


def test_low_temperature_equals_greedy():
    torch.manual_seed(5)
    logits = torch.randn(16, V)
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all()
    greedy = Sampler()(logits, _batch([SamplingParams(temperature=0)] * 16)).sampled_token_ids
    assert torch.equal(greedy, logits.argmax(-1))
    # A 1e-5-ish temperature scales a >= 1e-3 gap to >= 100 nats: argmax every time.
    cold = Sampler()(logits, _batch([SamplingParams(temperature=2e-5)] * 16)).sampled_token_ids
    assert torch.equal(cold, greedy)


def _seeded_run(seed, companions, steps=20):
    """Tokens one seeded request draws over `steps` steps, next to other requests."""
    torch.manual_seed(99 + len(companions))        # the global generator differs per run
    params = [SamplingParams(seed=seed)] + companions
    gens = [make_generator(p, "cpu") for p in params]
    logits = torch.zeros(len(params), V)           # uniform: every token equally likely
    out = []
    for _ in range(steps):
        batch = _batch(params, generators=gens)
        out.append(int(Sampler()(logits, batch).sampled_token_ids[0]))
    return out


def test_same_seed_same_tokens_whatever_the_batch():
    alone = _seeded_run(7, [])
    crowded = _seeded_run(7, [SamplingParams(), SamplingParams(temperature=0),
                              SamplingParams(seed=8, top_k=3)])
    assert alone == crowded
    assert _seeded_run(8, []) != alone
    assert len(set(alone)) > 5


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.9]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25)
    batch = _batch([params], prompts=[[0, 4]], outputs=[[3, 3, 2]])
    penalized = logits.clone()
    apply_penalties(penalized, batch)
    expected = torch.tensor([[
        2.0 / 2,                      # in the prompt, positive: divided
        -1.0,                         # unseen
        0.5 / 2 - 0.25 * 1 - 0.5,     # output once
        3.0 / 2 - 0.25 * 2 - 0.5,     # output twice
        -2.0 * 2,                     # in the prompt, negative: multiplied
        0.9]])                        # unseen
    torch.testing.assert_close(penalized, expected)
    # Greedy picks from the penalized logits: token 0 (1.0), not token 3 (raw argmax).
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [0]
    # Presence/frequency ignore the prompt; repetition alone leaves unseen tokens as they are.
    only_rep = _batch([SamplingParams(temperature=0, repetition_penalty=0.5)], prompts=[[1]],
                      outputs=[[]])
    penalized = logits.clone()
    apply_penalties(penalized, only_rep)
    torch.testing.assert_close(penalized, torch.tensor([[2.0, -0.5, 0.5, 3.0, -2.0, 0.9]]))


def test_mixed_params_in_one_batch():
    torch.manual_seed(3)
    logits = torch.randn(5, V)
    params = [SamplingParams(temperature=0),
              SamplingParams(top_k=1, seed=1),                       # top-1 == argmax
              SamplingParams(seed=11, temperature=0.9, top_p=0.9),
              SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(seed=12, min_p=0.1, frequency_penalty=1.0)]
    prompts = [[1, 2], [3], [4, 5, 6], [int(logits[3].argmax())], [7]]
    outputs = [[], [8], [9, 9], [], [int(logits[4].argmax())]]
    together = Sampler()(logits, _batch(params, prompts, outputs)).sampled_token_ids
    for i, p in enumerate(params):
        # Each row alone, with a fresh generator from the same seed, gives the same token.
        alone = Sampler()(logits[i:i + 1], _batch([p], [prompts[i]], [outputs[i]])).sampled_token_ids
        assert int(together[i]) == int(alone[0]), i
    assert int(together[0]) == int(logits[0].argmax())
    assert int(together[1]) == int(logits[1].argmax())
    assert int(together[3]) != int(logits[3].argmax())    # penalized away from the argmax


def test_logprobs_match_float64_reference():
    torch.manual_seed(4)
    logits = torch.randn(3, V) * 3
    params = [SamplingParams(logprobs=5, seed=1), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0.5, presence_penalty=2.0, logprobs=2, seed=2)]
    batch = _batch(params, outputs=[[], [], [int(logits[2].argmax())]])
    out = Sampler()(logits, batch)
    reference = torch.log_softmax(logits.double(), dim=-1)       # raw: before penalties
    chosen = reference.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.sampled_logprobs.double(), chosen, atol=1e-5, rtol=0)
    ranks = (reference > chosen.unsqueeze(1)).sum(-1) + 1
    assert torch.equal(out.sampled_ranks, ranks)
    assert out.top_logprobs.shape == (3, 5)
    top = reference.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs.double(), top.values, atol=1e-5, rtol=0)
    assert Sampler()(logits, _batch([SamplingParams()] * 3)).sampled_logprobs is None


def test_min_tokens_blocks_stop_tokens():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0      # eos
    logits[:, 5] = 9.0       # a stop token id
    logits[:, 7] = 8.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5]),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5])]
    outputs = [[1], [1, 1], [1, 1, 1]]     # the last row has reached min_tokens
    out = Sampler()(logits, _batch(params, outputs=outputs, eos=[2]))
    assert out.sampled_token_ids.tolist() == [7, 2, 2]


def test_bad_inputs():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, V), _batch([SamplingParams()]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SamplingBatch.from_requests([SamplingParams()], [None], [], [[]])


@pytest.mark.cuda
def test_on_cuda_matches_rules():
    torch.manual_seed(6)
    logits = torch.randn(4, V, device="cuda") * 2
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=3),
              SamplingParams(top_k=4, seed=5), SamplingParams(top_p=0.5, seed=6),
              SamplingParams(min_p=0.3, presence_penalty=0.5)]

    def run():
        gens = [make_generator(p, "cuda") for p in params]
        batch = SamplingBatch.from_requests(params, gens, [[1, 2]] * 4, [[3]] * 4, "cuda")
        return Sampler()(logits, batch)

    first, second = run(), run()
    assert torch.equal(first.sampled_token_ids[:3], second.sampled_token_ids[:3])   # seeded rows
    assert int(first.sampled_token_ids[1]) in logits[1].topk(4).indices.tolist()
    reference = torch.log_softmax(logits[0].double(), dim=-1)
    torch.testing.assert_close(first.top_logprobs[0].double(), reference.topk(3).values,
                               atol=1e-5, rtol=0)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def _mixed_batch(num_rows=6, penalties=True):
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3, V + 10]),
              SamplingParams(top_k=4, temperature=0.8, seed=1),
              SamplingParams(top_p=0.7, temperature=1.3, logprobs=2),
              SamplingParams(min_p=0.2, temperature=0.8),
              SamplingParams(top_k=9, top_p=0.9, temperature=0.8),
              SamplingParams(temperature=0.8,
                             repetition_penalty=1.2 if penalties else 1.0,
                             presence_penalty=0.5 if penalties else 0.0)][:num_rows]
    if not penalties:
        params[0] = SamplingParams(temperature=0)
    return params, _batch(params, prompts=[[1, 2]] * len(params), outputs=[[4]] * len(params))


def test_sampler_never_reads_the_device_back():
    """On a GPU every host read of a tensor value (int(), bool(), .item(), a boolean mask's
    nonzero) stalls the step; the sampler must leave the one sync to its caller."""
    params, batch = _mixed_batch()
    assert batch.max_top_k == 9 and batch.shared_temperature is None
    assert batch.banned_tokens[1].tolist() == [3]           # id beyond the vocab dropped on the host
    logits = torch.randn(len(params), V)
    with _OpRecorder() as rec:
        out = Sampler()(logits, batch)
    host_reads = [f for f, _ in rec.ops if f.__name__.startswith(("_local_scalar_dense", "nonzero", "item"))]
    assert host_reads == []
    assert int(out.sampled_token_ids[0]) != 3 and int(out.sampled_token_ids[1]) in logits[1].topk(4).indices


def test_shared_temperature_is_found_on_the_host():
    batch = _batch([SamplingParams(temperature=0.5), SamplingParams(temperature=0),
                    SamplingParams(temperature=0.5, top_k=3)])
    assert batch.shared_temperature == 0.5 and batch.max_top_k == 3
    assert _batch([SamplingParams(temperature=0)]).shared_temperature is None


def test_logits_are_copied_only_when_written():
    """No [S, V] copy of float32 logits unless the min_tokens ban or a penalty writes into
    them; when they do, the caller's tensor is left as it was."""
    _, plain = _mixed_batch(penalties=False)
    logits = torch.randn(6, V)
    with _OpRecorder() as rec:
        Sampler()(logits, plain)
    copies = [f for f, shape in rec.ops if shape == (6, V) and f.__name__.startswith(
        ("_to_copy", "clone", "copy_"))]
    assert copies == []
    _, penalized = _mixed_batch()
    before = logits.clone()
    Sampler()(logits, penalized)
    assert torch.equal(logits, before)


def test_rows_without_penalties_need_no_token_lists():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=2.0)]
    logits = torch.zeros(2, V)
    logits[:, 5] = 1.0
    logits[:, 6] = 0.5
    batch = SamplingBatch.from_requests(params, [None, None], [None, [9]], [None, [5]], "cpu",
                                        num_output_tokens=[0, 1])
    # Row 1 saw 5 once: 1.0 - 2.0 < 0.5, so it picks 6; row 0 is untouched.
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [5, 6]


@pytest.mark.parametrize("top_p", [1e-50, 1e-45, 1e-9])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    # float32 rounds 1e-50 to 0 (and 1e-45 to a denormal): the nucleus must still hold
    # the top token, so every row draws its argmax (not id 0).
    torch.manual_seed(3)
    logits = torch.randn(32, V)
    logits[:, 0] = -10.0                      # id 0 is never the answer
    drawn = Sampler()(logits, _batch([SamplingParams(top_p=top_p, temperature=1.5)] * 32))
    assert torch.equal(drawn.sampled_token_ids, logits.argmax(-1))


def test_valid_vocab_size_never_samples_padded_ids():
    """Columns past the tokenizer's vocabulary carry the largest logits here; they are
    never sampled (hot or greedy), and logprobs are the log-softmax over the valid ids."""
    valid = V - 10
    torch.manual_seed(4)
    logits = torch.randn(400, V, dtype=torch.float64)
    logits[:, valid:] += 8.0
    params = [SamplingParams(temperature=4.0, logprobs=3)] * 399 + [SamplingParams(temperature=0, logprobs=3)]
    out = Sampler(valid_vocab_size=valid)(logits.float().clone(), _batch(params))
    ids = out.sampled_token_ids
    assert int(ids.max()) < valid
    assert len(set(ids.tolist())) > valid // 2          # still samples broadly
    assert int(ids[-1]) == int(logits[-1, :valid].argmax())
    ref = torch.log_softmax(logits[:, :valid], dim=-1)
    assert torch.allclose(out.sampled_logprobs.double(), ref.gather(1, ids.unsqueeze(1)).squeeze(1),
                          atol=1e-5)
    assert torch.allclose(out.top_logprobs.double(), ref.topk(3, dim=-1).values, atol=1e-5)
    assert int(out.top_token_ids.max()) < valid
    # Without the mask the padded ids dominate (the test would see them).
    assert int(Sampler()(logits.float(), _batch(params)).sampled_token_ids.max()) >= valid
    with pytest.raises(ValueError, match="valid_vocab_size"):
        Sampler(valid_vocab_size=0)
