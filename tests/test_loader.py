"""Loading: ModelConfig parsing, safetensors errors, dtype, and GGUF round trips
(checkpoint -> GGUF as llama.cpp's converter writes it -> fastllm) against transformers."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from checkpoints import (gguf_roundtrip, gguf_tensor_type, load_hf_model, write_checkpoint,
                         write_gguf)
from fastllm.config import ModelConfig
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.loader import load_model

PROMPTS = ([5, 17, 99, 3, 250, 41, 7], [300, 12], [9] * 3 + list(range(40, 70)))


def prefill_logits(model, config, prompts=PROMPTS, block_size=16):
    """[S, vocab] last-token logits of one flattened prefill of all prompts."""
    blocks = [-(-len(p) // block_size) for p in prompts]
    starts = [sum(blocks[:i]) for i in range(len(prompts))]
    tables = torch.zeros(len(prompts), max(blocks), dtype=torch.int32)
    slots = []
    for i, p in enumerate(prompts):
        tables[i, :blocks[i]] = torch.arange(starts[i], starts[i] + blocks[i])
        slots += [(starts[i] + pos // block_size) * block_size + pos % block_size for pos in range(len(p))]
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata(torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32),
                             torch.tensor([0] + lens).cumsum(0).to(torch.int32))
    kv = allocate_kv_caches(config, sum(blocks), block_size, next(model.parameters()).dtype)
    with torch.no_grad():
        return model(torch.tensor(sum(prompts, [])),
                     torch.cat([torch.arange(n) for n in lens]), kv, meta)


def hf_logits(hf, prompts=PROMPTS):
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1].float() for p in prompts])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ ModelConfig
def test_config_reads_hf_dir_and_generation_defaults(tmp_path):
    path = write_checkpoint(tmp_path, "qwen2", generation={"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                           "eos_token_id": [2, 5]})
    config = ModelConfig.from_hf_dir(path)
    assert config.architecture == "Qwen2ForCausalLM"
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (64, 4, 2, 16, 384)
    assert config.attention_bias and not config.o_proj_bias and config.tie_word_embeddings
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.eos_token_ids == [2, 5] and config.bos_token_id == 1
    assert config.generation_defaults == {"temperature": 0.7, "top_p": 0.9}


def test_config_llama3_rope_and_legacy_fields():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64,
                intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
                num_key_value_heads=2)
    legacy = ModelConfig.from_hf_dict({**base, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                                       "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert legacy.head_dim == 8 and legacy.dtype == "bfloat16"
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3})


# ------------------------------------------------------------------ HF directory errors
def test_missing_path_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    path = write_checkpoint(tmp_path / "ckpt", "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(path)


def test_missing_shard(tmp_path):
    path = write_checkpoint(tmp_path, "mistral", sharded=True)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(path)


def test_wrong_architecture(tmp_path):
    path = write_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(path)


def test_checkpoint_of_another_architecture(tmp_path):
    # A Qwen2 checkpoint (q/k/v biases) whose config claims Llama: the biases are unexpected.
    path = write_checkpoint(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias'"):
        load_model(path)


def test_corrupt_safetensors_header(tmp_path):
    path = write_checkpoint(tmp_path, "llama")
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8:8 + header_len] = b"{" + b"#" * (header_len - 1)
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(path)


def test_truncated_safetensors(tmp_path):
    path = write_checkpoint(tmp_path, "llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(path)


def test_shape_mismatch_names_tensor(tmp_path):
    path = write_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape \(.*expected"):
        load_model(path)


def test_missing_and_extra_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_checkpoint(tmp_path, "llama")
    tensors = load_file(str(path / "model.safetensors"))
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.v_proj.weight"]
    save_file(missing, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.v_proj\.weight"):
        load_model(path)
    extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
             "model.layers.0.mystery.weight": torch.ones(3)}
    save_file(extra, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        load_model(path)


def test_absent_lm_head_ties_to_embeddings(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_checkpoint(tmp_path, "mistral")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model, config = load_model(path)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_dtype_bfloat16_and_auto(tmp_path):
    path = write_checkpoint(tmp_path, "llama")
    hf = load_hf_model(path)
    ref = hf_logits(hf)
    model, config = load_model(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rel_err(prefill_logits(model, config), ref) < 5e-2
    model, config = load_model(path, dtype="auto")   # config.json says float32
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, dtype="int8")


# ------------------------------------------------------------------ GGUF
GGUF_CASES = [("llama", "F32"), ("llama", "F16"), ("llama", "Q8_0"), ("llama-tied", "mixed"),
              ("qwen2", "F32"), ("qwen2", "Q4_0")]


def _gguf_checkpoint(tmp_path, arch):
    if arch == "llama-tied":  # SmolLM2's shape of things: tied embeddings, plain rope
        return write_checkpoint(tmp_path / "hf", "llama", tie_word_embeddings=True,
                                rope_scaling=None, rope_theta=100000.0, seed=3)
    return write_checkpoint(tmp_path / "hf", arch, seed=3)


@pytest.mark.parametrize("arch,tensor_type", GGUF_CASES, ids=[f"{a}-{t}" for a, t in GGUF_CASES])
def test_gguf_matches_transformers(tmp_path, arch, tensor_type):
    pytest.importorskip("gguf")
    hf_path = _gguf_checkpoint(tmp_path, arch)
    gguf_file = write_gguf(hf_path, tmp_path / "model.gguf", tensor_type)
    model, config = load_model(gguf_file)
    hf_config = json.loads((hf_path / "config.json").read_text())
    assert config.architecture == hf_config["architectures"][0]
    assert config.tie_word_embeddings == hf_config["tie_word_embeddings"]
    assert (config.num_key_value_heads, config.vocab_size) == (hf_config["num_key_value_heads"], 384)
    assert config.eos_token_ids == [2] and config.bos_token_id == 1

    hf = load_hf_model(hf_path)
    ours = prefill_logits(model, config)
    if tensor_type == "F32":
        assert rel_err(ours, hf_logits(hf)) < 1e-4
        return
    # Quantized: equal to transformers running the same quantized-then-dequantized weights
    # (quantization acts along rows, so it commutes with the Q/K row permutation) ...
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(gguf_roundtrip(param, gguf_tensor_type(name, param.ndim, tensor_type)))
    assert rel_err(ours, hf_logits(hf)) < 1e-4
    # ... and 8/16-bit quantization stays near the original model (4-bit on random,
    # unusually large weights does not, so only the check above applies to it).
    if tensor_type in ("F16", "Q8_0"):
        original = hf_logits(load_hf_model(hf_path))
        assert rel_err(ours, original) < 0.1
        assert torch.nn.functional.cosine_similarity(ours, original).min() > 0.99


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(not_gguf)
    from gguf import GGUFWriter
    w = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture 'gpt2'"):
        load_model(tmp_path / "gpt2.gguf")
    good = write_gguf(write_checkpoint(tmp_path / "hf", "llama"), tmp_path / "ok.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-4096])
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_model(truncated)

