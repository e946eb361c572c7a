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
from fastllm.model.loader import load_for_engine, load_model, resolve_device, resolve_dtype

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
    assert config.bos_token_id == 1
    # eos ids are the tokenizer's alone (test_eos_ids_come_from_the_tokenizer_only).
    assert not hasattr(config, "eos_token_ids")
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


# ------------------------------------------------------------------ dtype / device rules
CUDA = torch.device("cuda")   # resolve_dtype only looks at the type: no GPU needed


@pytest.mark.parametrize("checkpoint_dtype,on_cuda", [
    ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
    ("float32", torch.bfloat16), (None, torch.bfloat16)])
def test_resolve_dtype_auto_rule(checkpoint_dtype, on_cuda):
    # auto: bf16 on CUDA unless the checkpoint is fp16; fp32 on CPU whatever it says.
    assert resolve_dtype("auto", CUDA, checkpoint_dtype) == on_cuda
    assert resolve_dtype("auto", "cpu", checkpoint_dtype) == torch.float32


def test_resolve_dtype_names_and_errors():
    assert resolve_dtype("half", "cpu") == torch.float16
    assert resolve_dtype("torch.bfloat16", CUDA, "float16") == torch.bfloat16  # explicit wins
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="torch.int8"):
        resolve_dtype(torch.int8, "cpu")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="'mps'"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    # CUDA devices come back indexed: torch.device("cuda") != torch.device("cuda:0").
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_load_for_engine_and_its_users(tmp_path):
    from fastllm.bench import models
    from fastllm.config import EngineConfig
    from fastllm.engine.llm_engine import LLMEngine
    path = write_checkpoint(tmp_path, "llama", dtype="float16")   # config.json: float16
    loaded = load_for_engine(path, dtype="auto", device="cpu")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32   # auto on CPU
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.config == ModelConfig.from_hf_dir(path)
    # LLMEngine.from_pretrained and the benchmarks' loader resolve the same way.
    engine = LLMEngine.from_pretrained(str(path), EngineConfig(num_kv_blocks=8, max_model_len=64),
                                       dtype="bfloat16", device="cpu")
    assert engine.dtype == torch.bfloat16 and engine.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 for p in engine.runner.model.parameters())
    bench = models.load(model=str(path), device="cpu", dtype="auto")
    assert (bench.device, bench.dtype, bench.config) == (loaded.device, loaded.dtype, loaded.config)
    assert torch.equal(bench.model.lm_head.weight, loaded.model.lm_head.weight)
    with pytest.raises(ValueError, match="dtype"):
        load_for_engine(path, dtype="int4", device="cpu")


def test_eos_ids_come_from_the_tokenizer_only(tmp_path):
    from fastllm.config import EngineConfig
    from fastllm.engine.llm_engine import LLMEngine
    from fastllm.sampling_params import SamplingParams
    from fastllm.tokenizer import Tokenizer
    # config.json eos 2, generation_config.json eos [2, 5]: the tokenizer holds both.
    path = write_checkpoint(tmp_path, "llama", generation={"eos_token_id": [2, 5]})
    hf_tok = Tokenizer.from_pretrained(path)
    assert hf_tok.eos_token_ids == [2, 5]
    model, config = load_model(path)

    def generate(eos_ids):
        """Greedy tokens for one prompt from an engine whose tokenizer ends on eos_ids."""
        tok = Tokenizer(hf_tok.backend, extra_eos_token_ids=eos_ids)
        engine = LLMEngine(model, config, EngineConfig(num_kv_blocks=8, max_model_len=64), tok,
                           device="cpu", dtype=torch.float32)
        engine.add_request("r", [5, 17, 99, 3], SamplingParams(temperature=0, max_tokens=6))
        outs = [o for _ in range(20) if engine.has_unfinished_requests() for o in engine.step()]
        return outs[-1].outputs[0]

    free = generate([])             # no eos: the model's own greedy tokens, all 6
    assert len(free.token_ids) == 6 and free.finish_reason == "length"
    # The tokenizer's ids end it: stop on the last token that first appears late.
    stop_at = max(i for i, t in enumerate(free.token_ids) if t not in free.token_ids[:i])
    out = generate([free.token_ids[stop_at]])
    assert out.token_ids == free.token_ids[:stop_at + 1] and out.finish_reason == "stop"


# ------------------------------------------------------------------ GGUF
def test_gguf_metadata_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    from fastllm.model.gguf_loader import field_value, open_gguf, read_metadata
    file = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 0.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("llama.attention.head_count_kv", [4, 4, 2])
    # A vocabulary piece that is half of a UTF-8 character: U+FFFD, not an error.
    w.add_array("tokenizer.ggml.tokens", ["a", "世".encode()[:2], "é"])
    w.add_array("tokenizer.ggml.scores", [0.25, -1.5, 2.0])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    reader = open_gguf(file)
    assert read_metadata(reader, prefixes=("tokenizer.",)) == {
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "\ufffd", "é"], "tokenizer.ggml.scores": [0.25, -1.5, 2.0]}
    meta = read_metadata(reader)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 3
    assert meta["llama.rope.freq_base"] == 0.5
    assert field_value(reader.get_field("llama.attention.head_count_kv")) == [4, 4, 2]
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


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
    assert config.bos_token_id == 1 and not hasattr(config, "eos_token_ids")

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



@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("qwen2", {}), ("mistral", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
])
def test_expected_shapes_are_the_models_checkpoint_weights(arch, overrides):
    # The pre-build shape check (arithmetic on the config) against the shapes of the
    # parameters the model really has (built on the meta device: no memory).
    from checkpoints import hf_config
    from fastllm.model.checkpoint_shapes import expected_tensor_shapes
    from fastllm.model.llama import LlamaForCausalLM
    config = ModelConfig.from_hf_dict(hf_config(arch, **overrides).to_dict())
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    real = {name: tuple(param.shape if rows is None else param[rows].shape)
            for name, (param, rows) in model.checkpoint_weights().items()}
    assert {name: shape for name, (shape, _) in expected_tensor_shapes(config).items()} == real
