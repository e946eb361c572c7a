"""Hugging Face transformers baselines that run on the very weights a fastllm model holds.

`hf_model_sharing_weights` builds the transformers CausalLM on the meta device and points
each of its parameters at the matching rows of fastllm's (fused q/k/v and gate/up
parameters are [out, in] matrices, so each part is a contiguous row slice: a view, no
copy). Both engines then run one copy of the weights: 16 GB for an 8B model in bf16, not
32, and the tokens they generate can be compared one for one.

Generation, greedy and never stopping early (the benchmark's ignore_eos):
- `hf_static_generate`: `model.generate` on batches of `batch_size` prompts, left padded;
  each batch runs to its longest request's output length.
- `hf_continuous_generate`: transformers' own continuous batching (the manager behind
  `generate_batch`), each request with its own max_new_tokens. Raises `HFUnavailable`
  where the installed transformers has none.
Both return (generated token ids per prompt, elapsed seconds).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence

import torch

from fastllm.bench.runner import sync
from fastllm.config import ModelConfig

PAD_TOKEN_ID = 0     # left padding; masked out, so its value does not matter


class HFUnavailable(RuntimeError):
    """The installed transformers cannot run this baseline (the reason is the message)."""


def hf_config_from_model_config(config: ModelConfig, architecture: Optional[str] = None):
    """A transformers config with fastllm's shapes (Llama, Mistral or Qwen2)."""
    import transformers
    arch = architecture or config.architecture
    classes = {"LlamaForCausalLM": transformers.LlamaConfig,
               "MistralForCausalLM": transformers.MistralConfig,
               "Qwen2ForCausalLM": transformers.Qwen2Config}
    if arch not in classes:
        raise ValueError(f"architecture {arch!r} has no transformers baseline; "
                         f"supported: {', '.join(classes)}")
    kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads,
                  num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                  max_position_embeddings=config.max_position_embeddings,
                  tie_word_embeddings=config.tie_word_embeddings, hidden_act="silu",
                  bos_token_id=config.bos_token_id,
                  eos_token_id=None,   # baselines never stop early (see _no_eos)
                  pad_token_id=config.pad_token_id)
    if config.rope_scaling:
        kwargs["rope_scaling"] = dict(config.rope_scaling)
    if arch == "LlamaForCausalLM":
        kwargs.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    elif arch == "MistralForCausalLM":
        kwargs.update(sliding_window=config.sliding_window)
    elif arch == "Qwen2ForCausalLM":
        kwargs.update(use_sliding_window=False)
    return classes[arch](**kwargs)


@torch.no_grad()
def hf_model_sharing_weights(fastllm_model, hf_config, device, dtype: torch.dtype):
    """The transformers CausalLM of `hf_config` whose parameters are views of
    `fastllm_model`'s (see the module docstring). Raises ValueError naming any
    transformers parameter that has no counterpart."""
    from transformers import AutoModelForCausalLM
    device = torch.device(device)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    targets = fastllm_model.checkpoint_weights()
    embed = targets["model.embed_tokens.weight"][0]
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        if name in targets:
            param, rows = targets[name]
            view = param if rows is None else param[rows]
        elif name == "lm_head.weight" and getattr(hf_config, "tie_word_embeddings", False):
            view = embed
        else:
            raise ValueError(f"transformers parameter {name!r} has no counterpart in the fastllm model")
        module_name, _, leaf = name.rpartition(".")
        module = hf.get_submodule(module_name)
        if tuple(view.shape) != tuple(getattr(module, leaf).shape):
            raise ValueError(f"transformers parameter {name!r} has shape "
                             f"{tuple(getattr(module, leaf).shape)}, fastllm's is {tuple(view.shape)}")
        module._parameters[leaf] = torch.nn.Parameter(view, requires_grad=False)
    # Buffers (rotary inv_freq) are computed, not loaded: rebuild their modules for real.
    for module_name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(config=hf.config).to(device)
            hf.set_submodule(module_name, fresh)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"transformers tensors left unmaterialised: {left[:8]}")
    return hf.eval()


@contextlib.contextmanager
def _no_eos(model):
    """ignore_eos: the model's own generation_config must not reintroduce an eos."""
    gen = model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = None
    try:
        yield
    finally:
        gen.eos_token_id = saved


@torch.no_grad()
def hf_static_generate(model, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                       batch_size: int) -> tuple[list, float]:
    """Greedy `model.generate` over consecutive batches of `batch_size` prompts, left
    padded. Outputs are cut to each request's own length (the rest of a batch's steps
    are the padding waste static batching pays for)."""
    from transformers import GenerationConfig
    if batch_size < 1:
        raise ValueError(f"--hf-batch-size must be >= 1, got {batch_size}")
    device = model.device
    outputs = []
    sync(device)
    t0 = time.perf_counter()
    with _no_eos(model):
        for start in range(0, len(prompts), batch_size):
            batch = [list(p) for p in prompts[start:start + batch_size]]
            lens = list(output_lens[start:start + batch_size])
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), PAD_TOKEN_ID, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                attention_mask[row, width - len(prompt):] = 1
            config = GenerationConfig(max_new_tokens=max(lens), min_new_tokens=None, do_sample=False,
                                      eos_token_id=None, pad_token_id=PAD_TOKEN_ID)
            out = model.generate(input_ids=input_ids.to(device),
                                 attention_mask=attention_mask.to(device),
                                 generation_config=config)
            new = out[:, width:].tolist()
            outputs.extend(row[:n] for row, n in zip(new, lens))
    sync(device)
    return outputs, time.perf_counter() - t0


@torch.no_grad()
def hf_continuous_generate(model, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                           timeout_s: float = 3600.0) -> tuple[list, float]:
    """transformers' continuous batching, each request with its own max_new_tokens.
    The manager's setup (KV sizing, CUDA graph warmup) is not timed."""
    from transformers import GenerationConfig
    if not hasattr(model, "continuous_batching_context_manager"):
        import transformers
        raise HFUnavailable(f"transformers {transformers.__version__} has no continuous batching "
                            f"(continuous_batching_context_manager)")
    # eos -1 = disabled (the manager's own convention; None makes it warn and use -1).
    config = GenerationConfig(max_new_tokens=max(output_lens), do_sample=False, eos_token_id=-1,
                              pad_token_id=PAD_TOKEN_ID)
    ids = [f"r{i}" for i in range(len(prompts))]
    results = {}
    with _no_eos(model), model.continuous_batching_context_manager(
            generation_config=config, block=True, timeout=5) as manager:
        sync(model.device)
        t0 = time.perf_counter()
        for rid, prompt, n in zip(ids, prompts, output_lens):
            manager.add_request(list(prompt), request_id=rid, max_new_tokens=int(n))
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise HFUnavailable("transformers' continuous batching thread stopped early")
                if time.perf_counter() - t0 > timeout_s:
                    raise HFUnavailable(f"transformers' continuous batching did not finish in {timeout_s} s")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise HFUnavailable(f"transformers' continuous batching failed a request: {result.error}")
                results[result.request_id] = list(result.generated_tokens)
        sync(model.device)
        elapsed = time.perf_counter() - t0
    return [results[rid] for rid in ids], elapsed


FIRST_TOKENS = 16   # issue 10's bf16 bar: the first 16 greedy tokens agree on most prompts


def agreement(got: Sequence[Sequence[int]], expected: Sequence[Sequence[int]]) -> dict:
    """How far two engines' greedy outputs agree: requests identical, requests whose first
    FIRST_TOKENS tokens are identical, and the mean length of the common prefix as a
    fraction of the expected length (bf16 drifts after a while)."""
    if len(got) != len(expected):
        raise ValueError(f"agreement: {len(got)} outputs vs {len(expected)} expected")
    identical, first_same, prefix_fracs = 0, 0, []
    for a, b in zip(got, expected):
        a, b = list(a), list(b)
        identical += a == b
        first_same += a[:FIRST_TOKENS] == b[:FIRST_TOKENS]
        common = 0
        for x, y in zip(a, b):
            if x != y:
                break
            common += 1
        prefix_fracs.append(common / len(b) if b else 1.0)
    n = len(expected)
    return {"identical_requests": identical, "num_requests": n,
            "identical_fraction": identical / n if n else 1.0,
            f"first_{FIRST_TOKENS}_identical_fraction": first_same / n if n else 1.0,
            "mean_common_prefix_fraction": sum(prefix_fracs) / n if n else 1.0}
