"""Every checkpoint tensor's shape against the config, before the model is built.

A config (or GGUF metadata) that disagrees with its tensors must fail in milliseconds,
as llama.cpp fails it, not after allocating the model it describes: hidden 32768 over
64-wide tensors would allocate 12.9 GB first, and a claimed 3000 layers in a 2-layer
file would build 3000 layers before finding the tensors missing. Only the checkpoint's
index is read (names and shapes), never its data.

Shapes are in the Hugging Face checkpoint layout (torch order, q/k/v and gate/up
separate), which both loaders produce; LlamaForCausalLM.checkpoint_weights fuses them.
"""
from __future__ import annotations

import re
from typing import Optional

from fastllm.config import ModelConfig

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)    # rope buffers of old Llama conversions


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[tuple, str]]:
    """HF tensor name -> (shape, the config fields that give it). lm_head.weight is
    listed only for untied embeddings."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    hidden, inter = c.hidden_size, c.intermediate_size
    Q, KV = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    shapes = {"model.embed_tokens.weight": ((c.vocab_size, hidden), "vocab_size, hidden_size"),
              "model.norm.weight": ((hidden,), "hidden_size")}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = ((c.vocab_size, hidden), "vocab_size, hidden_size")
    layer = {
        "self_attn.q_proj.weight": ((q, hidden), f"{Q}, hidden_size"),
        "self_attn.k_proj.weight": ((kv, hidden), f"{KV}, hidden_size"),
        "self_attn.v_proj.weight": ((kv, hidden), f"{KV}, hidden_size"),
        "self_attn.o_proj.weight": ((hidden, q), f"hidden_size, {Q}"),
        "mlp.gate_proj.weight": ((inter, hidden), "intermediate_size, hidden_size"),
        "mlp.up_proj.weight": ((inter, hidden), "intermediate_size, hidden_size"),
        "mlp.down_proj.weight": ((hidden, inter), "hidden_size, intermediate_size"),
        "input_layernorm.weight": ((hidden,), "hidden_size"),
        "post_attention_layernorm.weight": ((hidden,), "hidden_size"),
    }
    if c.attention_bias:
        layer.update({"self_attn.q_proj.bias": ((q,), Q), "self_attn.k_proj.bias": ((kv,), KV),
                      "self_attn.v_proj.bias": ((kv,), KV)})
    if c.o_proj_bias:
        layer["self_attn.o_proj.bias"] = ((hidden,), "hidden_size")
    if c.mlp_bias:
        layer.update({"mlp.gate_proj.bias": ((inter,), "intermediate_size"),
                      "mlp.up_proj.bias": ((inter,), "intermediate_size"),
                      "mlp.down_proj.bias": ((hidden,), "hidden_size")})
    for i in range(c.num_hidden_layers):
        for name, spec in layer.items():
            shapes[f"model.layers.{i}.{name}"] = spec
    return shapes


def check_tensor_shapes(shapes: dict, config: ModelConfig, source: str,
                        display: Optional[dict] = None, fields: Optional[dict] = None) -> None:
    """shapes: HF tensor name -> shape as stored. Raises ValueError naming the tensor and
    the config field for a wrong shape, an unexpected or a missing tensor.
    display: HF name -> the name in the file (GGUF); fields: config field -> where the
    file keeps it (GGUF metadata keys), for the messages."""
    display = display or {}

    def shown(name, quote=True):
        if name in display:
            return f"{display[name]!r} ({name})"
        return repr(name) if quote else name

    def field_text(spec):
        for field, key in (fields or {}).items():
            spec = re.sub(rf"\b{field}\b", f"{field} [{key}]", spec)
        return spec

    _check_layer_count(shapes, config, source, fields)
    expected = expected_tensor_shapes(config)
    tied = config.tie_word_embeddings
    for name, shape in shapes.items():
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise ValueError(f"{source}: unexpected tensor {shown(name)} for {config.architecture} "
                             f"(wrong architecture or num_hidden_layers in the config?)")
        want, spec = expected[name]
        if tuple(int(d) for d in shape) != want:
            raise ValueError(f"{source}: tensor {shown(name)} has shape {tuple(int(d) for d in shape)}, "
                             f"expected {want} = ({field_text(spec)}) from the config")
    missing = [n for n in expected if n not in shapes and n != "lm_head.weight"]
    if missing:
        listed = ", ".join(shown(n, quote=False) for n in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"{source}: missing tensors: {listed}{more}")


def _check_layer_count(shapes: dict, config: ModelConfig, source: str, fields) -> None:
    # Before listing every expected tensor: a claimed layer count far past the file's
    # would otherwise build a list as long as the claim.
    layers = {int(m.group(1)) for m in map(_LAYER_RE.match, shapes) if m}
    if config.num_hidden_layers > len(layers):
        key = f" [{fields['num_hidden_layers']}]" if fields and "num_hidden_layers" in fields else ""
        raise ValueError(f"{source}: num_hidden_layers{key} = {config.num_hidden_layers} but the "
                         f"checkpoint holds tensors for {len(layers)} layers")
