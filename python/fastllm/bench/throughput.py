"""`python -m fastllm.bench throughput`: fastllm vs Hugging Face transformers, same
checkpoint, same requests, same run.

N requests of random token ids, either all --input-len in / --output-len out, or with
--random-lengths each drawn uniformly from --input-range / --output-range (seeded).
Every engine decodes greedily and never stops early (ignore_eos), so each request makes
exactly its output length and the engines do the same useful work:

- fastllm: every request submitted at once to the engine (what `LLM.generate` does).
- hf_static: transformers `model.generate` on batches of --hf-batch-size, left padded
  (a batch runs until its longest request is done; only each request's own tokens count).
- hf_continuous: transformers' own continuous batching, where the installed version has
  it; skipped with a note otherwise or when it fails.

Reported per engine: output tokens/s (useful tokens only), requests/s, and the ratios
fastllm / each HF baseline; plus how far HF's greedy tokens agree with fastllm's (identical
in float32; bf16 rounding makes long generations drift apart).

The model: --model DIR|FILE, or --random-weights with --config PRESET (random weights of
that shape made on the device, no checkpoint on disk). transformers gets the same weights
without a second copy (fastllm.bench.hf_baseline). fastllm runs first; its KV cache is
freed before transformers runs, so each gets the device's memory.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from typing import Callable, Optional

import torch

from fastllm.bench import models
from fastllm.bench.hf_baseline import (HFUnavailable, agreement, hf_config_from_model_config,
                                       hf_continuous_generate, hf_model_sharing_weights,
                                       hf_static_generate)
from fastllm.bench.runner import add_engine_arguments, device_defaults, engine_config_from_args, sync, write_json
from fastllm.config import EngineConfig
from fastllm.sampling_params import RequestOutputKind, SamplingParams

HF_MODES = ("static", "continuous")


def make_requests(num_prompts: int, vocab_size: int, seed: int, input_len: int = 0,
                  output_len: int = 0, input_range: Optional[tuple] = None,
                  output_range: Optional[tuple] = None) -> tuple[list, list]:
    """(prompts as token-id lists, output lengths). Fixed lengths, or each length drawn
    uniformly from an inclusive (min, max) range when the range is given. Token ids are
    uniform over the vocabulary, so no two prompts share a prefix (no prefix-cache hits)."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)

    def lengths(fixed, span, flag):
        if span is None:
            if fixed < 1:
                raise ValueError(f"--{flag} must be >= 1, got {fixed}")
            return [fixed] * num_prompts
        lo, hi = span
        if not 1 <= lo <= hi:
            raise ValueError(f"--{flag.replace('len', 'range')} must be MIN,MAX with "
                             f"1 <= MIN <= MAX, got {span}")
        return [rng.randint(lo, hi) for _ in range(num_prompts)]

    in_lens = lengths(input_len, input_range, "input-len")
    out_lens = lengths(output_len, output_range, "output-len")
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in in_lens]
    return prompts, out_lens


def run_batch(engine, prompts: list, output_lens: list, tag: str = "bench",
              after_step: Optional[Callable[[], None]] = None,
              on_finished: Optional[Callable[[object], None]] = None) -> tuple[list, float]:
    """The benchmarks' engine loop (LLM.generate's): every request submitted at once,
    greedy with ignore_eos, final outputs only, stepped to completion. after_step() runs
    after every step (inside the timed region: callers subtract its own cost);
    on_finished(output) as each request finishes.
    -> (RequestOutput per prompt, in order; elapsed seconds)."""
    results = {}
    sync(engine.device)
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        engine.add_request(f"{tag}-{i}", prompt,
                           SamplingParams(max_tokens=int(n), ignore_eos=True, temperature=0.0,
                                          output_kind=RequestOutputKind.FINAL_ONLY))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
                if on_finished is not None:
                    on_finished(out)
        if after_step is not None:
            after_step()
    sync(engine.device)
    elapsed = time.perf_counter() - t0
    return [results[f"{tag}-{i}"] for i in range(len(prompts))], elapsed


def fastllm_generate(engine, prompts: list, output_lens: list, tag: str = "bench") -> tuple[list, float]:
    """run_batch -> (generated token ids per prompt, elapsed seconds)."""
    outputs, elapsed = run_batch(engine, prompts, output_lens, tag)
    return [list(out.outputs[0].token_ids) for out in outputs], elapsed


def summarize(outputs: list, output_lens: list, elapsed: float) -> dict:
    """Useful output tokens (each request's own length; extra tokens a static batch made
    for its longest member do not count) per second, and requests per second."""
    useful = sum(min(len(o), n) for o, n in zip(outputs, output_lens))
    return {"status": "ok", "elapsed_s": elapsed, "output_tokens": useful,
            "output_tok_s": useful / elapsed, "requests_per_s": len(outputs) / elapsed}


def run_throughput(loaded, prompts: list, output_lens: list, engine_config: EngineConfig,
                   hf_modes=HF_MODES, hf_batch_size: int = 32, hf_architecture: Optional[str] = None,
                   warmup: bool = True, hf_num_prompts: Optional[int] = None,
                   hf_timeout_s: Optional[float] = None,
                   on_engine_done: Optional[Callable[[dict], None]] = None) -> dict:
    """Run fastllm then each HF mode; -> {"engines": {name: metrics}, "ratios": ...,
    "agreement": ..., "notes": [...], "token_ids": {name: outputs}}.

    hf_num_prompts: the HF baselines run only the first N requests (rates are compared;
    agreement is over those N). hf_timeout_s: transformers' continuous batching gives up
    after that long (a note; static batching cannot be interrupted). on_engine_done(engines)
    after each engine, so a caller can save what is measured before a slow baseline."""
    _check_throughput_args(prompts, hf_modes, hf_num_prompts, hf_timeout_s)
    hf_count = len(prompts) if hf_num_prompts is None else hf_num_prompts
    engines, token_ids, notes = {}, {}, []
    done = on_engine_done or (lambda _engines: None)
    warm = [p[:8] for p in prompts[:2]] if warmup else None   # short: setup costs not timed

    engine = models.make_engine(loaded, engine_config)
    if warm:
        fastllm_generate(engine, warm, [4] * len(warm), tag="warmup")
    outs, elapsed = fastllm_generate(engine, prompts, output_lens)
    engines["fastllm"] = summarize(outs, output_lens, elapsed)
    engines["fastllm"]["kv_blocks_total"] = engine.get_stats().kv_blocks_total
    token_ids["fastllm"] = outs
    done(engines)
    del engine                                   # its KV cache goes back before HF runs
    models.release(loaded.device)

    if hf_modes:
        _run_hf_baselines(loaded, prompts[:hf_count], output_lens[:hf_count], hf_modes,
                          hf_batch_size, hf_architecture, hf_timeout_s, warm,
                          engines, token_ids, notes, done)
    ratios, agree = _ratios(engines, token_ids)
    return {"engines": engines, "ratios": ratios, "agreement": agree, "notes": notes,
            "token_ids": token_ids}


def _check_throughput_args(prompts, hf_modes, hf_num_prompts, hf_timeout_s) -> None:
    for mode in hf_modes:
        if mode not in HF_MODES:
            raise ValueError(f"--hf-modes: unknown mode {mode!r}; choose from {', '.join(HF_MODES)}")
    if hf_num_prompts is not None and not 1 <= hf_num_prompts <= len(prompts):
        raise ValueError(f"--hf-num-prompts must be in [1, {len(prompts)}] (the number of "
                         f"requests), got {hf_num_prompts}")
    if hf_timeout_s is not None and not hf_timeout_s > 0:
        raise ValueError(f"--hf-timeout must be > 0 seconds, got {hf_timeout_s}")


def _run_hf_baselines(loaded, hf_prompts, hf_lens, hf_modes, hf_batch_size, hf_architecture,
                      hf_timeout_s, warm, engines, token_ids, notes, done) -> None:
    """Each HF mode on the weights fastllm just ran; fills engines / token_ids / notes."""
    hf_config = _hf_config(loaded, hf_architecture)
    hf = hf_model_sharing_weights(loaded.model, hf_config, loaded.device, loaded.dtype)
    continuous_kw = {} if hf_timeout_s is None else {"timeout_s": hf_timeout_s}
    runners = {"static": lambda p, n: hf_static_generate(hf, p, n, hf_batch_size),
               "continuous": lambda p, n: hf_continuous_generate(hf, p, n, **continuous_kw)}
    for mode in hf_modes:
        name = f"hf_{mode}"
        try:
            if warm:
                runners[mode](warm, [4] * len(warm))
            outs, elapsed = runners[mode](hf_prompts, hf_lens)
        except HFUnavailable as e:
            notes.append(f"{name} skipped: {e}")
            engines[name] = {"status": "skipped", "error": str(e)}
            done(engines)
            continue
        except Exception as e:  # noqa: BLE001 - a baseline failing must not lose fastllm's numbers
            if mode == "static":
                raise
            notes.append(f"{name} failed: {type(e).__name__}: {e}")
            engines[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            done(engines)
            continue
        finally:
            models.release(loaded.device)
        engines[name] = summarize(outs, hf_lens, elapsed)
        engines[name]["num_requests"] = len(hf_prompts)
        token_ids[name] = outs
        done(engines)
    del hf
    models.release(loaded.device)


def _ratios(engines: dict, token_ids: dict) -> tuple[dict, dict]:
    ratios, agree = {}, {}
    for name, m in engines.items():
        if name == "fastllm" or m.get("status") != "ok":
            continue
        ratios[f"fastllm/{name}"] = {
            "output_tok_s": engines["fastllm"]["output_tok_s"] / m["output_tok_s"],
            "requests_per_s": engines["fastllm"]["requests_per_s"] / m["requests_per_s"]}
        agree[name] = agreement(token_ids["fastllm"][:len(token_ids[name])], token_ids[name])
    return ratios, agree


def _hf_config(loaded, architecture: Optional[str]):
    """The checkpoint's own config.json where there is one, else one from fastllm's config."""
    name = loaded.name
    if not name.startswith("random:") and os.path.isdir(name):
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(name)
    return hf_config_from_model_config(loaded.config, architecture)


def preset_architecture(preset: Optional[str]) -> Optional[str]:
    """The transformers architecture a random preset stands for (models.RANDOM_PRESETS are
    all built as Llama layers in fastllm; Mistral's differ only in the sliding window)."""
    if preset and preset.startswith("mistral"):
        return "MistralForCausalLM"
    return None


# -- CLI ---------------------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --random-weights [PRESET] / --config PRESET, --device, --dtype (shared with
    fastllm.bench.latency)."""
    parser.add_argument("--model", default=None, help="HF model directory or .gguf file")
    parser.add_argument("--random-weights", nargs="?", const="", default=None, metavar="PRESET",
                        help="random weights of a preset shape instead of a checkpoint "
                             f"({', '.join(models.RANDOM_PRESETS)}); the preset may be given "
                             "here or with --config")
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help="the --random-weights preset (default tiny on CPU, llama3-8b on GPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto",
                        help="auto (checkpoint's half dtype or bf16 on GPU, float32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, prompts and lengths")


def resolve_preset(args) -> Optional[str]:
    """The random-weights preset named by --random-weights PRESET and/or --config PRESET."""
    if args.random_weights is None:
        if args.config is not None:
            raise ValueError("--config names a random-weights preset: add --random-weights")
        return None
    if args.model is not None:
        raise ValueError("give exactly one of --model PATH and --random-weights")
    named = [p for p in (args.random_weights, args.config) if p]
    if len(set(named)) > 1:
        raise ValueError(f"--random-weights {args.random_weights!r} and --config {args.config!r} disagree")
    if named:
        return named[0]
    from fastllm.model.loader import resolve_device
    return "llama3-8b" if resolve_device(args.device).type == "cuda" else "tiny"


def load_model(args):
    preset = resolve_preset(args)
    if preset is None and args.model is None:
        raise ValueError("give --model PATH or --random-weights [--config PRESET]")
    return models.load(model=args.model, random_weights=preset, device=args.device,
                       dtype=args.dtype, seed=args.seed), preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=None, help="requests (1000 GPU, 8 CPU)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (256 GPU, 16 CPU)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (256 GPU, 8 CPU)")
    parser.add_argument("--random-lengths", action="store_true",
                        help="draw each request's lengths from --input-range / --output-range")
    parser.add_argument("--input-range", default=None, metavar="MIN,MAX",
                        help="with --random-lengths (default 32,1024 GPU; 4,32 CPU)")
    parser.add_argument("--output-range", default=None, metavar="MIN,MAX",
                        help="with --random-lengths (default 32,512 GPU; 2,16 CPU)")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="transformers static batch size (64 GPU, 4 CPU)")
    parser.add_argument("--hf-modes", default=",".join(HF_MODES),
                        help="comma-separated transformers baselines: static, continuous")
    parser.add_argument("--hf-num-prompts", type=int, default=None, metavar="N",
                        help="run the transformers baselines on the first N requests only "
                             "(default all; rates are compared)")
    parser.add_argument("--hf-timeout", type=float, default=None, metavar="SECONDS",
                        help="give up transformers' continuous batching after this long (a note)")
    parser.add_argument("--skip-hf", action="store_true", help="run fastllm alone")
    add_engine_arguments(parser)
    parser.add_argument("--no-warmup", action="store_true", help="time the first (cold) run too")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


def run(args: argparse.Namespace) -> dict:
    loaded, preset = load_model(args)
    pick = device_defaults(loaded.device.type == "cuda")

    num_prompts = pick(args.num_prompts, 1000, 8)
    if args.random_lengths:
        in_range = _range(pick(args.input_range, "32,1024", "4,32"), "--input-range")
        out_range = _range(pick(args.output_range, "32,512", "2,16"), "--output-range")
        prompts, output_lens = make_requests(num_prompts, loaded.config.vocab_size, args.seed,
                                             input_range=in_range, output_range=out_range)
    else:
        prompts, output_lens = make_requests(num_prompts, loaded.config.vocab_size, args.seed,
                                             pick(args.input_len, 256, 16),
                                             pick(args.output_len, 256, 8))
    hf_modes = [] if args.skip_hf else [m for m in args.hf_modes.split(",") if m]
    engine_config = engine_config_from_args(args)
    try:        # only the HF baselines need transformers (a test dependency)
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    meta = dict(
        bench="throughput", model=loaded.name, device=_device_name(loaded.device),
        dtype=str(loaded.dtype).replace("torch.", ""), torch=torch.__version__,
        transformers=hf_version, num_prompts=num_prompts,
        random_lengths=bool(args.random_lengths),
        input_tokens=sum(len(p) for p in prompts), output_tokens=sum(output_lens),
        input_len_range=[min(map(len, prompts)), max(map(len, prompts))],
        output_len_range=[min(output_lens), max(output_lens)],
        hf_batch_size=pick(args.hf_batch_size, 64, 4), seed=args.seed,
        hf_num_prompts=args.hf_num_prompts if args.hf_num_prompts is not None else num_prompts)

    def save_partial(engines: dict) -> None:
        # What is measured so far, in case a slow baseline outlives the caller's time limit.
        if args.json:
            write_json(args.json, {**meta, "engines": engines, "partial": True})

    result = run_throughput(loaded, prompts, output_lens, engine_config, hf_modes,
                            pick(args.hf_batch_size, 64, 4), preset_architecture(preset),
                            warmup=not args.no_warmup, hf_num_prompts=args.hf_num_prompts,
                            hf_timeout_s=args.hf_timeout, on_engine_done=save_partial)
    result.update(meta, partial=False)
    print(format_results(result))
    if args.json:
        write_json(args.json, {k: v for k, v in result.items() if k != "token_ids"})
        print(f"wrote {args.json}")
    return result


def format_results(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}): {result['num_prompts']} "
             f"requests, {result['input_tokens']} prompt / {result['output_tokens']} output tokens"]
    for name, m in result["engines"].items():
        if m.get("status") != "ok":
            lines.append(f"  {name:<14} {m['status']}: {m.get('error', '')}")
            continue
        lines.append(f"  {name:<14} {m['output_tok_s']:>10.1f} tok/s {m['requests_per_s']:>8.2f} req/s "
                     f"({m['elapsed_s']:.2f} s)")
    for name, r in result["ratios"].items():
        a = result["agreement"][name.split("/", 1)[1]]
        lines.append(f"  {name:<22} {r['output_tok_s']:.2f}x tok/s; greedy tokens identical in "
                     f"{a['identical_requests']}/{a['num_requests']} requests")
    lines.extend(f"  note: {n}" for n in result["notes"])
    return "\n".join(lines)


def _range(text: str, flag: str) -> tuple:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be MIN,MAX (two integers), got {text!r}") from None
    return lo, hi


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
