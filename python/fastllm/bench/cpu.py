"""`python -m fastllm.bench cpu`: fastllm against transformers and llama.cpp on the CPU,
on the same GGUF file at the same thread count.

Engines (each skipped with a note when it cannot run here):
  fastllm-gguf   the file's blocks kept as stored (quantization="gguf", the default)
  fastllm-f32    dequantized to float32 at load (quantization=None)
  fastllm-bf16   dequantized to bfloat16 (the CPU middle option)
  hf-f32         transformers, the GGUF loaded with gguf_file= (dequantized, float32)
  llama.cpp      llama-cpp-python on the same file, when installed (a benchmark
                 dependency only: `pip install llama-cpp-python`, which builds llama.cpp)
  llama.cpp-fa   llama.cpp on the same file with flash attention: compared with llama.cpp,
                 how far fp32-level differences alone move greedy tokens on this file
  llama.cpp-f32  llama.cpp on an F32 file of the model (bench/cpu_files.py makes it)
  fastllm-q4km / llama.cpp-q4km   both on a Q4_K_M file of the model (made the same way)

Workloads, greedy: batch-1 decode (ms/token: the time of --decode-tokens more tokens
after the first, per token), --prefill-len-token prefill (tok/s: one request, one output
token), and throughput (--batch prompts x --batch-len in / --batch-len out, output tok/s).
Greedy tokens of the decode run are compared with fastllm-f32's (same precision:
hf-f32; same file: llama.cpp and fastllm-gguf) and the agreement is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

ENGINES = ("fastllm-gguf", "llama.cpp", "llama.cpp-fa", "fastllm-f32", "llama.cpp-f32", "fastllm-bf16", "hf-f32",
           "fastllm-q4km", "llama.cpp-q4km")
# Pairs on the same file / precision whose greedy tokens are compared: engine -> peer.
# llama.cpp-fa against llama.cpp is llama.cpp against itself (flash attention on / off: the
# same weights and int8 activations, attention summed in another order): the agreement
# that fp32-level differences alone leave on this file, the ceiling for fastllm-gguf's.
SAME_PRECISION = {"llama.cpp": "fastllm-gguf", "llama.cpp-fa": "llama.cpp", "llama.cpp-f32": "fastllm-f32",
                  "llama.cpp-q4km": "fastllm-q4km"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-len", type=int, default=64)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--agreement-prompts", type=int, default=8,
                        help="greedy agreement is counted over this many prompts (each run alone, "
                             "--decode-tokens tokens); 0 skips it")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (all its threads), "
                             "steadier on a machine shared with other jobs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every engine this many times, round-robin, and keep each one's best "
                             "(on a machine shared with other jobs, ratios taken interleaved are fairer; "
                             "> 1 keeps all engines loaded at once)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")


def _prompt(n: int, seed: int, vocab: int) -> list:
    """n random token ids (the same for every engine), clear of the special ids at the start."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab // 4), min(vocab, 30000), (n,), generator=g).tolist()


class FastllmEngine:
    def __init__(self, path, quantization, dtype):
        from fastllm import LLM
        self.llm = LLM(path, device="cpu", dtype=dtype, quantization=quantization, enable_prefix_caching=False)
        self.vocab_size = self.llm.llm_engine.model_config.vocab_size

    def generate(self, prompts, max_tokens):
        from fastllm import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, params, use_tqdm=False)]


class HFEngine:
    def __init__(self, path):
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        self.vocab_size = self.model.config.vocab_size

    @torch.no_grad()
    def generate(self, prompts, max_tokens):
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("hf engine: prompts of equal length only")
        ids = torch.tensor(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()


class LlamaCppEngine:
    def __init__(self, path, threads, n_ctx=1024, flash_attn=False):
        import llama_cpp
        # An F32 KV cache (llama.cpp's default is F16), as fastllm's on the CPU: the greedy
        # comparison is then of the weights' and activations' arithmetic only.
        self.llama = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                     n_batch=512, verbose=False, logits_all=False, flash_attn=flash_attn,
                                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        self.vocab_size = self.llama.n_vocab()

    def generate(self, prompts, max_tokens):
        outs = []
        for p in prompts:  # the high-level binding runs one sequence at a time
            self.llama.reset()
            toks = []
            for tok in self.llama.generate(p, temp=0.0, top_k=1, reset=True):
                toks.append(tok)
                if len(toks) == max_tokens:
                    break
            outs.append(toks)
        return outs


_clock = time.perf_counter


def _time(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def measure(engine, args, with_tokens: bool = True) -> dict:
    """decode ms/token, prefill tok/s, throughput tok/s and (with_tokens) the greedy tokens
    of the agreement prompts, each generated alone (batch-1 arithmetic, as llama.cpp's)."""
    vocab = engine.vocab_size
    prompt = _prompt(16, 0, vocab)
    engine.generate([prompt], 2)                                       # warm-up
    first = min(_time(lambda: engine.generate([prompt], 1)) for _ in range(2))
    tokens = []
    full = _time(lambda: tokens.extend(engine.generate([prompt], args.decode_tokens + 1)))
    result = {"decode_ms_per_token": 1000 * (full - first) / args.decode_tokens}
    if with_tokens and args.agreement_prompts > 0:
        result["tokens"] = [engine.generate([_prompt(16, 100 + i, vocab)], args.decode_tokens)[0]
                            for i in range(args.agreement_prompts)]
    long_prompt = _prompt(args.prefill_len, 1, vocab)
    result["prefill_tok_s"] = args.prefill_len / min(_time(lambda: engine.generate([long_prompt], 1))
                                                     for _ in range(2))
    if not args.skip_throughput:
        batch = [_prompt(args.batch_len, 10 + i, vocab) for i in range(args.batch)]
        elapsed = _time(lambda: engine.generate(batch, args.batch_len))
        result["throughput_out_tok_s"] = args.batch * args.batch_len / elapsed
    return result


def _make(name, path, threads):
    if name in ("fastllm-q4km", "llama.cpp-q4km", "llama.cpp-f32"):
        from fastllm.bench.cpu_files import derived_gguf
        path = derived_gguf(path, "F32" if name.endswith("f32") else "Q4_K_M", threads)
    if name in ("fastllm-gguf", "fastllm-q4km"):
        return FastllmEngine(path, "gguf", "float32")
    if name == "fastllm-f32":
        return FastllmEngine(path, None, "float32")
    if name == "fastllm-bf16":
        return FastllmEngine(path, None, "bfloat16")
    if name == "hf-f32" or name.startswith("llama.cpp"):
        # Own process, own OpenMP settings (fastllm.bench.cpu_peer says why).
        from fastllm.bench.cpu_peer import PeerProcess
        return PeerProcess({"hf-f32": "hf-f32", "llama.cpp-fa": "llama.cpp-fa"}.get(name, "llama.cpp"), path, threads)
    raise ValueError(f"--engines: unknown engine {name!r}; choose from {', '.join(ENGINES)}")


def agreement(a: list, b: list) -> str:
    """Over the prompts' greedy runs: how many are equal throughout, and the mean count of
    tokens equal up to the first difference."""
    prefixes = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        prefixes.append(next((i for i in range(n) if x[i] != y[i]), n))
    n = min((min(len(x), len(y)) for x, y in zip(a, b)), default=0)
    equal = sum(p == n for p in prefixes)
    return f"{equal}/{len(prefixes)} prompts equal (mean {sum(prefixes) / max(len(prefixes), 1):.1f}/{n} tokens)"


def run(args) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    path = args.model
    if path is None:
        from fastllm.model.default_model import default_model_path
        path = str(default_model_path())
    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = measure_rounds(names, path, args) if args.rounds > 1 else measure_each(names, path, args)
    add_agreements(results)
    print(format_table(results, path, args.threads) + f"\n(clock: {args.clock})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": path, "threads": args.threads, "results": results}, f, indent=1)


def _load(name, path, args):
    try:
        return _make(name, path, args.threads)
    except ImportError as e:
        print(f"{name}: skipped ({e})", flush=True)
        return None


def _report(name: str, result: dict) -> None:
    print(f"{name}: " + json.dumps({k: round(v, 2) for k, v in result.items() if k != "tokens"}), flush=True)


def measure_each(names: list, path: str, args) -> dict:
    """One engine at a time, each freed before the next loads."""
    results = {}
    for name in names:
        engine = _load(name, path, args)
        if engine is not None:
            results[name] = measure(engine, args)
            del engine
            _report(name, results[name])
    return results


def measure_rounds(names: list, path: str, args) -> dict:
    """Every engine loaded, measured args.rounds times round-robin; the best of each
    metric is kept (least ms/token, most tok/s)."""
    engines = {name: e for name in names if (e := _load(name, path, args)) is not None}
    results = {}
    for round_index in range(args.rounds):
        for name, engine in engines.items():
            r = measure(engine, args, with_tokens=round_index == 0)
            print(f"round {round_index + 1} {name}: " + json.dumps(
                {k: round(v, 2) for k, v in r.items() if k != "tokens"}), flush=True)
            best = results.setdefault(name, r)
            best["decode_ms_per_token"] = min(best["decode_ms_per_token"], r["decode_ms_per_token"])
            for key in ("prefill_tok_s", "throughput_out_tok_s"):
                if key in r:
                    best[key] = max(best[key], r[key])
    for name, r in results.items():
        _report(name, r)
    return results


def add_agreements(results: dict) -> None:
    """Greedy agreement of every engine with fastllm-f32, and of each llama.cpp run with
    fastllm on the same file (SAME_PRECISION)."""
    reference = results.get("fastllm-f32", {}).get("tokens")
    for name, r in results.items():
        if "tokens" not in r:
            continue
        if reference is not None and name != "fastllm-f32":
            r["greedy_agreement_vs_fastllm_f32"] = agreement(r["tokens"], reference)
        peer = SAME_PRECISION.get(name)
        if peer in results and peer != "fastllm-f32" and "tokens" in results[peer]:
            r["greedy_agreement_vs_" + peer.replace("-", "_")] = agreement(r["tokens"], results[peer]["tokens"])


def format_table(results: dict, path: str, threads: int) -> str:
    rows = [f"model {os.path.basename(path)}, {threads} threads",
            "| engine | decode ms/token | prefill tok/s | 32x64/64 out tok/s | greedy agreement |",
            "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        agree = ", ".join(f"{v} vs {k.split('_vs_')[1]}" for k, v in r.items() if k.startswith("greedy_agreement"))
        thr = r.get("throughput_out_tok_s")
        rows.append(f"| {name} | {r['decode_ms_per_token']:.1f} | {r['prefill_tok_s']:.0f} | "
                    f"{'-' if thr is None else f'{thr:.0f}'} | {agree or '-'} |")
    return "\n".join(rows)
