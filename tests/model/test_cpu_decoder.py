"""The C++ CPU decoder (model/cpu_decoder.py, fastllm.ops.CpuDecoder): every step's logits
and KV caches equal the module path's (the same model with model.cpu_decoder = None, layer
by layer through the torch modules) on small random checkpoints, dense and GGUF-quantized;
and bad caches, step tensors and weights are refused with a ValueError naming them."""
from __future__ import annotations

import random

import pytest
import torch

from checkpoints import load_hf_model, write_checkpoint, write_gguf
from fastllm import ops
from fastllm.model.cpu_linear import MAX_GEMV_TOKENS
from fastllm.model.quant_linear import DEQUANT_GEMM_MIN_TOKENS
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.loader import load_for_engine

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

BLOCK = 4
NUM_BLOCKS = 32
# Steps as [(sequence, new tokens)]: prefill chunks and decodes mixed as the engine mixes them.
DECODE = [[(0, 3)], [(0, 1)], [(0, 1)], [(0, 1)]]
MULTI_DECODE = [[(0, 2)], [(1, 3)], [(2, 1)], [(0, 1), (1, 1), (2, 1)], [(0, 1), (1, 1), (2, 1)]]
MIXED = [[(0, 6), (1, 2)], [(0, 1), (1, 5), (2, 3)], [(2, 1), (0, 1), (1, 1)]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_decoder")
    paths = {"llama": write_checkpoint(root / "llama", "llama", seed=3),
             "mistral": write_checkpoint(root / "mistral", "mistral", seed=4),
             "qwen2": write_checkpoint(root / "qwen2", "qwen2", seed=5)}
    for arch, qtype in (("llama", "Q4_0"), ("llama", "multi"), ("qwen2", "Q8_0"), ("mistral", "Q8_0")):
        pytest.importorskip("gguf")
        paths[f"{arch}-{qtype}"] = write_gguf(paths[arch], root / f"{arch}-{qtype}.gguf", qtype)
    return paths


def _load(path):
    model = load_for_engine(path, dtype=torch.float32, device="cpu").model
    assert model.cpu_decoder is not None
    return model


class _Sequences:
    """Token ids, positions and shuffled block tables of a few sequences, step by step."""

    def __init__(self, config, seed=0):
        rng = random.Random(seed)
        self.vocab = config.vocab_size
        self.blocks = rng.sample(range(NUM_BLOCKS), NUM_BLOCKS)   # shuffled physical blocks
        self.tables, self.lens, self.ids, self.rng = {}, {}, {}, rng

    def step(self, chunks):
        """-> (input_ids, positions, AttentionMetadata) of one step."""
        ids, pos, slots, lens, starts = [], [], [], [], [0]
        for seq, n in chunks:
            start = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < start + n:
                table.append(self.blocks.pop())
            new_ids = [self.rng.randrange(self.vocab) for _ in range(n)]
            self.ids.setdefault(seq, []).extend(new_ids)
            ids += new_ids
            pos += list(range(start, start + n))
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
            self.lens[seq] = start + n
            lens.append(start + n)
            starts.append(starts[-1] + n)
        width = max(len(self.tables[s]) for s, _ in chunks)
        tables = torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in chunks],
                              dtype=torch.int32)
        meta = AttentionMetadata(torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32),
                                 torch.tensor(starts, dtype=torch.int32), max_query_len=max(n for _, n in chunks))
        return torch.tensor(ids), torch.tensor(pos), meta


def _run(model, steps, decoder):
    """[S, vocab] logits of every step and the final caches, with or without the decoder;
    also how many of the steps went through layer 0's module (the module path)."""
    saved, model.cpu_decoder = model.cpu_decoder, (model.cpu_decoder if decoder else None)
    calls = []
    hook = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        kv = allocate_kv_caches(model.config, NUM_BLOCKS, BLOCK)
        seqs = _Sequences(model.config)
        logits = []
        for chunks in steps:
            ids, pos, meta = seqs.step(chunks)
            logits.append(model(ids, pos, kv, meta))
    finally:
        hook.remove()
        model.cpu_decoder = saved
    return logits, kv, len(calls)


def _assert_same(model, steps, expect_module_steps=0):
    got, got_kv, module_steps = _run(model, steps, decoder=True)
    want, want_kv, _ = _run(model, steps, decoder=False)
    assert module_steps == expect_module_steps
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    for (gk, gv), (wk, wv) in zip(got_kv, want_kv):
        torch.testing.assert_close(gk, wk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gv, wv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_dense_decode_matches_module_path(checkpoints, name):
    """fp32 weights (CpuDenseLinear): GQA 2:1 and 4:1, qkv bias (qwen2); T=1 and T=3 steps."""
    model = _load(checkpoints[name])
    assert model.cpu_decoder.max_tokens == MAX_GEMV_TOKENS
    _assert_same(model, DECODE)
    _assert_same(model, MULTI_DECODE)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoder_steps_match_transformers(checkpoints, name):
    """Against the independent reference: every step's logits (decodes of three sequences
    batched, T=3) equal transformers' last-token logits of each sequence so far."""
    model, hf = _load(checkpoints[name]), load_hf_model(checkpoints[name])
    kv = allocate_kv_caches(model.config, NUM_BLOCKS, BLOCK)
    seqs = _Sequences(model.config)
    for chunks in MULTI_DECODE:
        ids, pos, meta = seqs.step(chunks)
        calls = []
        hook = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
        got = model(ids, pos, kv, meta)
        hook.remove()
        assert not calls   # the C++ decoder ran the layers
        with torch.no_grad():
            want = torch.stack([hf(torch.tensor([seqs.ids[s]])).logits[0, -1] for s, _ in chunks])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_dense_prefill_stays_on_torch_gemm(checkpoints):
    """Dense steps over MAX_GEMV_TOKENS tokens keep the module path (torch's GEMM)."""
    model = _load(checkpoints["llama"])
    _assert_same(model, MIXED, expect_module_steps=2)   # the 8- and 9-token steps


def test_quantized_prefill_from_the_dequant_size_takes_the_module_path(checkpoints):
    """A step of DEQUANT_GEMM_MIN_TOKENS tokens runs the module path (QuantLinear dequantizes
    for the fp32 GEMM there); the steps after it, on the cache it wrote, the C++ decoder."""
    model = _load(checkpoints["llama-Q4_0"])
    _assert_same(model, [[(0, DEQUANT_GEMM_MIN_TOKENS)], [(0, 1)], [(0, 1), (1, 7)]], expect_module_steps=1)


@pytest.mark.parametrize("name", ["llama-Q4_0", "llama-multi", "qwen2-Q8_0", "mistral-Q8_0"])
def test_quantized_steps_match_module_path(checkpoints, name):
    """GGUF blocks kept (QuantLinear) below the dequantize + GEMM prefill size: decodes, and
    prefill chunks mixed with decodes; "multi" has q F16 | k Q4_0 | v Q8_0 segments in one
    fused projection."""
    model = _load(checkpoints[name])
    assert model.cpu_decoder.max_tokens == DEQUANT_GEMM_MIN_TOKENS - 1
    if name == "llama-multi":
        assert len(model.layers[0].self_attn.qkv_proj.ggml_types) == 3
    _assert_same(model, DECODE)
    _assert_same(model, MULTI_DECODE)
    _assert_same(model, MIXED)


def test_caches_are_rebound_when_the_list_changes(checkpoints):
    """A new caches list (the runner's after a reset) is bound and written; the old one is
    left as it was."""
    model = _load(checkpoints["llama-Q4_0"])
    first, kv_a, _ = _run(model, DECODE, decoder=True)
    snapshot = [(k.clone(), v.clone()) for k, v in kv_a]
    second, kv_b, _ = _run(model, DECODE, decoder=True)
    for g, w in zip(second, first):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for (k, v), (k0, v0), (kb, _) in zip(kv_a, snapshot, kv_b):
        assert torch.equal(k, k0) and torch.equal(v, v0) and kb.abs().sum() > 0


def test_switch_and_ineligible_models(checkpoints, monkeypatch):
    assert load_for_engine(checkpoints["llama"], dtype=torch.bfloat16, device="cpu").model.cpu_decoder is None
    monkeypatch.setenv("FASTLLM_CPU_DECODER", "0")
    assert load_for_engine(checkpoints["llama-Q4_0"], device="cpu").model.cpu_decoder is None


def _step_args(model, kv):
    """The ops.CpuDecoder.forward arguments of a 2-token prefill of one sequence."""
    ids, pos, meta = _Sequences(model.config).step([(0, 2)])
    hidden = model.embed_tokens(ids)
    cos, sin = model.rotary.cos_sin(pos, torch.float32)
    return dict(hidden=hidden, residual=torch.empty_like(hidden), has_residual=False, cos=cos, sin=sin,
                kv_caches=kv, slot_mapping=meta.slot_mapping, block_tables=meta.block_tables,
                seq_lens=meta.seq_lens, query_start_loc=meta.query_start_loc)


@pytest.mark.parametrize("change,match", [
    (lambda a, c: a.update(kv_caches=[(k.bfloat16(), v.bfloat16()) for k, v in a["kv_caches"]]),
     r"kv_caches\[0\]\.k_cache: expected dtype float32, got bfloat16"),
    (lambda a, c: a.update(kv_caches=a["kv_caches"][:1]), r"kv_caches: 1 \(k_cache, v_cache\) pairs for 2 layers"),
    (lambda a, c: a.update(kv_caches=[(k, v[..., :1, :].contiguous()) for k, v in a["kv_caches"]]),
     r"kv_caches\[0\]\.v_cache: dim 2 \(num_kv_heads\)"),
    (lambda a, c: a.update(hidden=a["hidden"].half()), r"hidden: expected dtype float32, got float16"),
    (lambda a, c: a.update(hidden=a["hidden"].double()), r"hidden: unsupported dtype"),
    (lambda a, c: a.update(residual=a["hidden"]), r"residual: must not overlap hidden"),
    (lambda a, c: a.update(cos=a["cos"][:, :1].contiguous()), r"cos: dim 1 \(head_dim / 2\)"),
    (lambda a, c: a["slot_mapping"].fill_(NUM_BLOCKS * BLOCK), r"slot_mapping: slot 128 at token 0"),
    (lambda a, c: a["block_tables"].fill_(NUM_BLOCKS), r"block_tables: block id 32 of sequence 0"),
    (lambda a, c: a.update(seq_lens=a["seq_lens"].long()), r"seq_lens: expected dtype int32, got int64"),
], ids=["cache-dtype", "cache-count", "cache-heads", "hidden-dtype", "hidden-f64", "residual-alias", "cos-shape",
        "slot-range", "block-id", "seq-lens-dtype"])
def test_bad_step_raises_value_error(checkpoints, change, match):
    model = _load(checkpoints["llama-Q4_0"])
    args = _step_args(model, allocate_kv_caches(model.config, NUM_BLOCKS, BLOCK))
    change(args, model.config)
    with pytest.raises(ValueError, match=match):
        model.cpu_decoder.decoder.forward(**args)


def _layers(model):
    from fastllm.model.cpu_decoder import _linear_spec
    return [[layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
             *(_linear_spec(m) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                         layer.mlp.gate_up_proj, layer.mlp.down_proj))]
            for layer in model.layers]


def _bad_segment(layers, index, make):
    segments, bias = layers[1][index]
    layers[1][index] = ([make(*segments[0])] + segments[1:], bias)


@pytest.mark.parametrize("change,match", [
    (lambda ls: ls[1].__setitem__(0, torch.ones(7)), r"layers\.1\.input_layernorm\.weight: dim 0 \(hidden_size\)"),
    (lambda ls: ls[1].__setitem__(1, torch.ones(64, dtype=torch.float16)),
     r"layers\.1\.post_attention_layernorm\.weight: expected dtype float32, got float16"),
    (lambda ls: ls[1].__setitem__(1, torch.ones(64, dtype=torch.float64)),
     r"layers\.1\.post_attention_layernorm\.weight: unsupported dtype"),
    (lambda ls: _bad_segment(ls, 2, lambda t, w: (t, w[:, :-2].contiguous())),
     r"layers\.1\.self_attn\.qkv_proj\.segment0: dim 1 \(bytes per row"),
    (lambda ls: _bad_segment(ls, 3, lambda t, w: (t, w[:-1].contiguous())),
     r"layers\.1\.self_attn\.o_proj: the segments hold 63 rows, expected out_features 64"),
    (lambda ls: _bad_segment(ls, 4, lambda t, w: (99, w)), r"layers\.1\.mlp\.gate_up_proj\.segment0: ggml type 99"),
    (lambda ls: ls[1].__setitem__(5, (ls[1][5][0], torch.zeros(3))), r"layers\.1\.mlp\.down_proj\.bias: dim 0"),
], ids=["norm-size", "norm-dtype", "norm-f64", "row-bytes", "row-count", "ggml-type", "bias-size"])
def test_bad_weights_raise_value_error_naming_them(checkpoints, change, match):
    model = _load(checkpoints["llama-Q4_0"])
    layers = _layers(model)
    change(layers)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    with pytest.raises(ValueError, match=match):
        ops.CpuDecoder(hidden_size=64, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                       head_dim=attn.head_dim, intermediate_size=mlp.intermediate_size, eps=1e-5,
                       scale=attn.scale, layers=layers)
