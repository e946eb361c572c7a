"""`python -m fastllm.bench spec`: speculative decoding's speed-up and acceptance rate.

Two workloads, greedy (so every method must give the same tokens, which is checked):

- repetitive: a chat prompt holding a paragraph of text and asking for it back with a
  small edit -- the output copies the prompt, where n-gram lookup shines;
- random: random token ids to continue -- little to look up.

At each batch size (--batch-sizes, default 1 and 32) every method runs the same
requests: no speculation, n-gram lookup, and a draft model (--draft-model, default the
target itself: acceptance ~1, which shows the mechanics' cost and ceiling). Throughput:
end to end = output tokens / wall seconds of the whole batch (batch 1: requests one after
another), prefill included; decode = output tokens after the first / the seconds from a
batch's first token to its last (what speculation speeds up). Speed-ups are decode
throughput against no speculation in the same run. Acceptance rate = accepted / proposed
drafts; mean accepted length = tokens per verifying sequence-step (accepted + 1).

The default model is SmolLM2-135M-Instruct (fastllm.model.default_model); on random
weights acceptance means nothing, so there is no --random-weights here.
"""
from __future__ import annotations

import argparse
import random
import time

from fastllm.bench.runner import write_json
from fastllm.sampling_params import SamplingParams

# Sentences written for this benchmark; a prompt's text is a shuffled handful of them.
SENTENCES = [
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Every morning the baker opens the shutters and sets out fresh loaves of bread.",
    "A small robot named Pim learned to sort the library books by the colour of their spines.",
    "The committee agreed to meet again on Thursday to review the revised budget.",
    "Rain fell softly on the tin roof while the children read stories by the fire.",
    "Engineers replaced the bridge's cables one at a time so traffic never stopped.",
    "The garden was full of tomatoes, beans and tall yellow sunflowers in August.",
    "She wrote the recipe on a card: two cups of flour, one egg and a pinch of salt.",
    "At noon the train from the coast arrived, carrying fish, letters and tourists.",
    "The museum's newest exhibit explains how ancient sailors navigated by the stars.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="target model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--draft-model", default=None, help="draft model (default: the target)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--methods", default="none,ngram,draft_model",
                        help="comma-separated: none, ngram, draft_model")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--workloads", default="repetitive,random")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch1-requests", type=int, default=2,
                        help="requests run one after another at batch size 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def spec_config(method: str, k: int, draft: str):
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    if method == "draft_model":
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    raise ValueError(f"--methods: unknown method {method!r} (none, ngram, draft_model)")


def make_prompts(tokenizer, workload: str, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = getattr(tokenizer, "vocab_size", None) or 40000
    prompts = []
    for _ in range(count):
        if workload == "repetitive":
            text = " ".join(rng.sample(SENTENCES, 3))
            ask = f"Repeat the following text exactly, but write 'city' instead of 'town':\n\n{text}"
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": ask}],
                                                         add_generation_prompt=True, tokenize=True))
        elif workload == "random":
            prompts.append([rng.randrange(100, min(40000, vocab)) for _ in range(32)])
        else:
            raise ValueError(f"--workloads: unknown workload {workload!r} (repetitive, random)")
    return prompts


def measure(llm, prompts: list, output_len: int, batch: int) -> dict:
    """Run prompts `batch` at a time; wall time, outputs, speculative stats of this run."""
    engine = llm.llm_engine
    before = engine.get_stats()
    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    outputs = []
    decode_seconds = 0.0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i:i + batch], sp, use_tqdm=False)
        outputs.extend(o.outputs[0].token_ids for o in outs)
        decode_seconds += (max(o.metrics.last_token_time for o in outs)
                           - min(o.metrics.first_token_time for o in outs))
    seconds = time.perf_counter() - start
    after = engine.get_stats()
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    verifications = after.spec_num_verifications - before.spec_num_verifications
    tokens = sum(len(o) for o in outputs)
    decode_tokens = tokens - len(outputs)
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_accepted_length": 1 + accepted / verifications if verifications else None,
            "outputs": outputs}


def run(args) -> dict:
    import torch

    from fastllm import LLM
    from fastllm.model.default_model import default_model_path
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = str(args.model or default_model_path())
    draft = str(args.draft_model or model)
    methods = args.methods.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    workloads = args.workloads.split(",")
    configs = {m: spec_config(m, args.num_speculative_tokens, draft) for m in methods}
    results = []
    for method in methods:
        llm = LLM(model, device=args.device, dtype=args.dtype, seed=args.seed,
                  max_num_seqs=max(batch_sizes), speculative_config=configs[method])
        tokenizer = llm.get_tokenizer()
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)     # warm-up
        for workload in workloads:
            for batch in batch_sizes:
                count = args.batch1_requests if batch == 1 else batch
                prompts = make_prompts(tokenizer, workload, count, args.seed)
                row = measure(llm, prompts, args.output_len, batch)
                row.update(method=method, workload=workload, batch=batch)
                results.append(row)
        llm.close()
    _compare(results)
    report = {"model": model, "draft_model": draft, "num_speculative_tokens": args.num_speculative_tokens,
              "output_len": args.output_len, "device": args.device,
              "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]}
    print(format_table(report["results"]))
    if args.json:
        write_json(args.json, report)
    return report


def _compare(results: list) -> None:
    """Speed-up against no speculation, and whether the tokens are the same (greedy)."""
    base = {(r["workload"], r["batch"]): r for r in results if r["method"] == "none"}
    for r in results:
        b = base.get((r["workload"], r["batch"]))
        ok = b and r["decode_tokens_per_s"] and b["decode_tokens_per_s"]
        r["speedup"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"] if ok else None
        r["end_to_end_speedup"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        r["same_tokens"] = r["outputs"] == b["outputs"] if b else None


def format_table(rows: list) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)
    lines = ["| workload | batch | method | decode tok/s | speed-up | end-to-end tok/s | speed-up | "
             "acceptance | mean accepted len | same tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['batch']} | {r['method']} | "
                     f"{f(r['decode_tokens_per_s'], '.1f')} | {f(r['speedup'], '.2f')} | "
                     f"{r['tokens_per_s']:.1f} | {f(r['end_to_end_speedup'], '.2f')} | "
                     f"{f(r['acceptance_rate'], '.2f')} | "
                     f"{f(r['mean_accepted_length'], '.2f')} | {r['same_tokens']} |")
    return "\n".join(lines)
