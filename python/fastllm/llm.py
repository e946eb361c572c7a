"""`LLM`: offline batch generation with vLLM's names (DESIGN §1).

    llm = LLM("path/or/file.gguf")                     # model=None: the default model
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=64))
    outs[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Optional, Sequence, Union

from fastllm.config import EngineConfig, ParallelConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.outputs import RequestOutput
from fastllm.sampling_params import RequestOutputKind, SamplingParams

PromptType = Union[str, list[int]]

# EngineConfig fields LLM(...) takes under the same name (what a replica is built with).
_LLM_CONFIG_FIELDS = ("block_size", "num_kv_blocks", "gpu_memory_utilization", "max_model_len",
                      "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                      "enable_chunked_prefill", "swap_space", "enforce_eager", "seed",
                      "max_logprobs")


class LLM:
    def __init__(self, model: Optional[str] = None, dtype="auto", device="auto",
                 tensor_parallel_size: int = 1, block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, num_kv_blocks: Optional[int] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, swap_space: float = 0,
                 enforce_eager: bool = False, seed: int = 0, max_logprobs: int = 20,
                 tokenizer=None, quantization: Optional[str] = "auto",
                 pipeline_parallel_size: int = 1, data_parallel_size: int = 1):
        """tensor_parallel_size * pipeline_parallel_size > 1: this process drives that many
        ranks (it spawns the others; under torchrun they are torchrun's, and on a rank
        other than 0 this constructor runs the worker loop, then exits the process).
        data_parallel_size > 1: that many replicas of all this, each in its own process."""
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                  pipeline_parallel_size=pipeline_parallel_size,
                                  data_parallel_size=data_parallel_size)
        if model is None:
            from fastllm.model.default_model import default_model_path
            model = default_model_path()
        model = os.fspath(model)
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                              gpu_memory_utilization=gpu_memory_utilization,
                              max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              enable_prefix_caching=enable_prefix_caching,
                              enable_chunked_prefill=enable_chunked_prefill,
                              swap_space=swap_space, enforce_eager=enforce_eager, seed=seed,
                              max_logprobs=max_logprobs)
        self.model_path = model
        # quantization: "auto" (= "gguf" for a .gguf file: its linear weights stay in their
        # blocks; None for an HF directory), "gguf", or None (dequantize at load).
        if parallel.data_parallel_size > 1:
            # N replicas, each an LLM of its own in its own process (engine/dp_client.py).
            from fastllm.engine.dp_client import DPClient
            replica = dict(dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size,
                           pipeline_parallel_size=pipeline_parallel_size,
                           quantization=quantization, tokenizer=tokenizer,
                           **{f: getattr(config, f) for f in _LLM_CONFIG_FIELDS})
            self.llm_engine = DPClient(model, parallel.data_parallel_size, replica,
                                       tokenizer=tokenizer)
        else:
            self.llm_engine = LLMEngine.from_pretrained(model, config, dtype=dtype, device=device,
                                                        tokenizer=tokenizer,
                                                        quantization=quantization,
                                                        parallel_config=parallel)
        self._request_counter = itertools.count()

    def close(self) -> None:
        """Release the engine's page-locked swap space and shut its parallel workers (or
        data-parallel replicas) down now (see LLMEngine.close); garbage collection and
        exit do it too."""
        self.llm_engine.close()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generation_defaults(self) -> dict:
        """The checkpoint's generation_config.json sampling defaults, under SamplingParams'
        names (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens)."""
        defaults = dict(self.llm_engine.model_config.generation_defaults or {})
        if "max_new_tokens" in defaults:
            defaults["max_tokens"] = defaults.pop("max_new_tokens")
        return defaults

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams() with the checkpoint's generation_config.json defaults, as vLLM
        applies them, then `overrides` (any SamplingParams field) on top."""
        return SamplingParams(**{**self.generation_defaults(), **overrides})

    get_default_sampling_params = default_sampling_params     # vLLM's name

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. A prompt is text or token ids;
        sampling_params is one for all or one per prompt."""
        prompts = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: Optional[str] = None,
             tools: Optional[list] = None, **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of them.
        tools: OpenAI function specs for the template's `tools` (or, for a template
        that takes none, a system prompt listing them)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations")
        # A list of conversations when its first entry is itself a list; else one conversation
        # (whose entries the template's normalize_messages checks, naming the bad one).
        conversations = list(messages) if isinstance(messages[0], (list, tuple)) else [messages]
        tok = self.get_tokenizer()
        prompts = [tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                           tokenize=True, chat_template=chat_template,
                                           tools=tools, **template_kwargs)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if not isinstance(sampling_params, (list, tuple)):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, "
                             f"got {type(sampling_params).__name__}")
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries but there are {n} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params entries must be SamplingParams, got {type(p).__name__}")
        return params

    def _run(self, prompts, params, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        # Only finished outputs are kept, so the engine builds nothing per step.
        final_only: dict[int, SamplingParams] = {}
        for sp in params:
            if id(sp) not in final_only:
                final_only[id(sp)] = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
        ids = []
        try:
            for prompt, sp in zip(prompts, params):
                rid = str(next(self._request_counter))
                engine.add_request(rid, prompt, final_only[id(sp)])
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)       # leave the engine clean for the next call
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]                      # one prompt of token ids
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                out.append(list(p))
            else:
                raise ValueError(f"prompts[{i}] must be a str or a list of token ids, "
                                 f"got {type(p).__name__}")
        return out
    raise ValueError(f"prompts must be a str, a list of token ids, or a list of those; "
                     f"got {type(prompts).__name__}")
