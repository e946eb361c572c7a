"""`python -m fastllm.bench structured`: what structured outputs cost, on the same requests.

The same N chat requests run twice on one engine: unconstrained, then constrained by a
JSON schema (StructuredOutputsParams(json=...)), alternating for --repeat rounds (best
round kept). Both decode exactly --output-len tokens per request, so the batch and the
work are the same and the difference is the grammar's: the default schema asks for a
long array (minItems) that no request can close within --output-len, and the free run
sets ignore_eos. Reported: output tokens/s of each and the cost, 1 - constrained/free,
over wall time and over this process's CPU time (all its threads: less sensitive to other
work on a shared machine, though not to their cache and memory traffic).

Sampling: --temperature (default 0.8, seeded per request) so that the constrained run
walks the grammar through varied states, as real traffic does.
"""
from __future__ import annotations

import json
import time

from fastllm.bench.runner import write_json

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "pattern": "^[A-Za-z ]{1,40}$"},
        "items": {"type": "array", "minItems": 500,
                  "items": {"type": "object",
                            "properties": {"id": {"type": "integer"},
                                           "name": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                                           "color": {"enum": ["red", "green", "blue"]},
                                           "ok": {"type": "boolean"}},
                            "required": ["id", "name", "color", "ok"]}},
    },
    "required": ["title", "items"],
}
PROMPT = "List {i} things in a shop as JSON: a title, then items with id, name, color and ok."


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best of each kept")
    parser.add_argument("--schema", default=None, help="a JSON schema file (default: a long shop listing)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--output-json", default=None)


def _params(args, constrained: bool, schema: dict):
    from fastllm import SamplingParams, StructuredOutputsParams
    structured = StructuredOutputsParams(json=schema) if constrained else None
    return [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.output_len,
                           ignore_eos=True, structured_outputs=structured)
            for i in range(args.num_prompts)]


def _round(llm, prompts, params) -> dict:
    """Wall and CPU seconds and output tokens of one LLM.generate over every request."""
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "output_tokens": tokens,
            "output_tok_s": tokens / seconds, "output_tok_per_cpu_s": tokens / cpu_seconds}


def run(args) -> None:
    from fastllm import LLM
    for name in ("num_prompts", "output_len", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    schema = DEFAULT_SCHEMA
    if args.schema:
        with open(args.schema, encoding="utf-8") as f:
            schema = json.load(f)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              num_kv_blocks=args.num_kv_blocks)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(i=i + 3)}])
               for i in range(args.num_prompts)]
    free, constrained = _params(args, False, schema), _params(args, True, schema)
    for params in (free, constrained):            # warm up both paths (and compile the grammar)
        llm.generate(prompts[:2], params[:2], use_tqdm=False)
    best = {"free": None, "constrained": None}
    for _ in range(args.repeat):
        for name, params in (("free", free), ("constrained", constrained)):
            r = _round(llm, prompts, params)
            if best[name] is None or r["output_tok_s"] > best[name]["output_tok_s"]:
                best[name] = r
    cost = 1.0 - best["constrained"]["output_tok_s"] / best["free"]["output_tok_s"]
    cpu_cost = 1.0 - best["constrained"]["output_tok_per_cpu_s"] / best["free"]["output_tok_per_cpu_s"]
    for name, r in best.items():
        print(f"{name:>11}: {r['output_tokens']} output tokens in {r['seconds']:.2f} s = "
              f"{r['output_tok_s']:.1f} tok/s ({r['output_tok_per_cpu_s']:.1f} per CPU-second)")
    print(f"structured-output cost: {cost * 100:.1f}% of output tok/s, {cpu_cost * 100:.1f}% of "
          f"tokens per CPU-second ({args.num_prompts} requests x {args.output_len} tokens)")
    if args.output_json:
        write_json(args.output_json, {"num_prompts": args.num_prompts, "output_len": args.output_len,
                                      "temperature": args.temperature, "cost": cost,
                                      "cpu_cost": cpu_cost, **best})
