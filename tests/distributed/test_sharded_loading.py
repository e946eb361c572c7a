"""Each tensor-parallel rank reads only its slice of the safetensors weights (counted at
safetensors' own API), the slices are the right rows and columns, pipeline stages read
only their layers, and a GGUF is dequantized then sliced. One process: loading needs no
communication, only each rank's position, so the ranks are played in turn."""
from __future__ import annotations

import pytest
import safetensors
import torch

from checkpoints import cached_checkpoint, write_gguf
from fastllm.distributed.communicator import Communicator, SingleRankCommunicator
from fastllm.distributed.parallel_state import ParallelContext
from fastllm.model.loader import load_model


class Position(Communicator):
    """A rank's place in a group, no peers (loading makes no collective call)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def context(tp_rank=0, tp=1, pp_rank=0, pp=1) -> ParallelContext:
    comm = lambda r, n: Position(r, n) if n > 1 else SingleRankCommunicator()  # noqa: E731
    return ParallelContext(tp=comm(tp_rank, tp), pp=comm(pp_rank, pp),
                           rank=pp_rank * tp + tp_rank, world_size=tp * pp)


class CountingReads:
    """safetensors.safe_open, recording what each tensor read materialises."""

    def __init__(self, real):
        self.real, self.elements, self.whole_reads = real, {}, []

    def __call__(self, *args, **kwargs):
        counter = self

        class Handle:
            def __init__(self):
                self.f = counter.real(*args, **kwargs)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                counter.whole_reads.append(name)
                return self.f.get_tensor(name)

            def get_slice(self, name):
                sl = self.f.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def __getitem__(self, index):
                        part = sl[index]
                        counter.elements[name] = counter.elements.get(name, 0) + part.numel()
                        return part
                return Slice()
        return Handle()


def _load_counting(monkeypatch, path, parallel):
    counter = CountingReads(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counter)
    model, _ = load_model(path, parallel=parallel)
    monkeypatch.setattr(safetensors, "safe_open", counter.real)
    return model, counter


def _full_tensors(path) -> dict:
    import glob
    from safetensors.torch import load_file
    tensors = {}
    for file in glob.glob(f"{path}/*.safetensors"):
        tensors.update(load_file(file))
    return tensors


REPLICATED = ("norm.weight", "layernorm.weight")     # read whole by every rank


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_each_tp_rank_reads_its_slice_only(monkeypatch, kv_heads):
    path = str(cached_checkpoint("llama", sharded=True, num_key_value_heads=kv_heads))
    full = _full_tensors(path)
    total = sum(t.numel() for t in full.values())
    for rank in range(2):
        model, counter = _load_counting(monkeypatch, path, context(rank, 2))
        assert counter.whole_reads == []
        for name, t in full.items():
            whole = name.endswith(REPLICATED) or (kv_heads == 1 and ("k_proj" in name or "v_proj" in name))
            assert counter.elements[name] == (t.numel() if whole else t.numel() // 2), name
        read = sum(counter.elements.values())
        assert read < 0.56 * total, (read, total)          # ~1/2 plus the small replicated parts
        _check_slices(model, full, rank, kv_heads)


def _check_slices(model, full, rank, kv_heads):
    d, inter = 16, 64                                      # head_dim 64/4; 128 / 2 ranks
    layer = model.layers[1]
    pre = "model.layers.1."
    q_rows = slice(rank * 2 * d, (rank + 1) * 2 * d)     # this rank's 2 of 4 q heads
    kv_rows = slice(rank * d, (rank + 1) * d) if kv_heads == 2 else slice(0, d)
    want_qkv = torch.cat([full[pre + "self_attn.q_proj.weight"][q_rows],
                          full[pre + "self_attn.k_proj.weight"][kv_rows],
                          full[pre + "self_attn.v_proj.weight"][kv_rows]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, want_qkv)
    assert torch.equal(layer.self_attn.o_proj.weight, full[pre + "self_attn.o_proj.weight"][:, q_rows])
    i_rows = slice(rank * inter, (rank + 1) * inter)
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat(
        [full[pre + "mlp.gate_proj.weight"][i_rows], full[pre + "mlp.up_proj.weight"][i_rows]]))
    assert torch.equal(layer.mlp.down_proj.weight, full[pre + "mlp.down_proj.weight"][:, i_rows])
    vocab_rows = slice(rank * 192, (rank + 1) * 192)
    assert torch.equal(model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab_rows])
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][vocab_rows])


def test_pipeline_stages_read_only_their_layers(monkeypatch):
    path = str(cached_checkpoint("llama", num_hidden_layers=3))
    full = _full_tensors(path)
    first, counter0 = _load_counting(monkeypatch, path, context(pp_rank=0, pp=2))
    last, counter1 = _load_counting(monkeypatch, path, context(pp_rank=1, pp=2))
    names0, names1 = set(counter0.elements), set(counter1.elements)
    assert names0 | names1 == set(full) and not names0 & names1
    assert all(n.startswith(("model.layers.0.", "model.layers.1.", "model.embed")) for n in names0)
    assert all(n.startswith(("model.layers.2.", "model.norm", "lm_head")) for n in names1)
    assert (len(first.layers), len(last.layers)) == (2, 1)
    assert first.lm_head is None and last.embed_tokens is None
    assert torch.equal(last.layers[0].mlp.down_proj.weight, full["model.layers.2.mlp.down_proj.weight"])


def test_tied_head_on_a_last_stage_reads_the_embedding():
    path = str(cached_checkpoint("qwen2"))                # tied: no lm_head.weight stored
    last, _ = load_model(path, parallel=context(tp_rank=1, tp=2, pp_rank=1, pp=2))
    full = _full_tensors(path)
    assert torch.equal(last.lm_head.weight, full["model.embed_tokens.weight"][192:])


def test_odd_vocabulary_pads_the_last_rank_with_zero_rows():
    path = str(cached_checkpoint("llama", vocab_size=383))
    full = _full_tensors(path)
    model, _ = load_model(path, parallel=context(1, 2))   # rows 192..383: 191 real + 1 padding
    assert model.embed_tokens.weight.shape[0] == 192
    assert torch.equal(model.embed_tokens.weight[:191], full["model.embed_tokens.weight"][192:])
    assert not model.embed_tokens.weight[191:].any() and not model.lm_head.weight[191:].any()


def test_gguf_is_dequantized_then_sliced(tmp_path, caplog):
    hf = cached_checkpoint("llama")
    gguf = write_gguf(hf, tmp_path / "m.gguf", "Q8_0")
    whole, _ = load_model(str(gguf), quantization=None)
    with caplog.at_level("INFO", logger="fastllm.model.loader"):
        rank1, _ = load_model(str(gguf), quantization="auto", parallel=context(1, 2))
    assert "dequantized" in caplog.text
    attn_whole, attn = whole.layers[0].self_attn, rank1.layers[0].self_attn
    assert type(attn.qkv_proj) is torch.nn.Linear          # no QuantLinear blocks under TP
    q = attn_whole.q_size                                   # 4 heads x 16; rank 1: heads 2, 3
    assert torch.equal(attn.qkv_proj.weight[:32], attn_whole.qkv_proj.weight[32:64])
    assert torch.equal(attn.qkv_proj.weight[32:48], attn_whole.qkv_proj.weight[q + 16:q + 32])
    assert torch.equal(attn.o_proj.weight, attn_whole.o_proj.weight[:, 32:])
    stage1, _ = load_model(str(gguf), quantization="auto", parallel=context(pp_rank=1, pp=2))
    assert len(stage1.layers) == 1 and stage1.embed_tokens is None
    assert torch.equal(stage1.layers[0].mlp.down_proj.weight, whole.layers[1].mlp.down_proj.weight)
