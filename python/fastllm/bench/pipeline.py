"""`python -m fastllm.bench pipeline`: the pipeline bubble, PP=M against PP=1.

One batch of `--num-prompts` random prompts (`--input-len` tokens, `--output-len` greedy
tokens each, ignore_eos) through `LLM(model, pipeline_parallel_size=...)`, three ways:

    pp1           one process (all of this machine's cores)
    ppM-serial    M spawned stages, one step at a time (FASTLLM_PP_MICROBATCHES=0):
                  every stage idles while the others compute
    ppM-micro     M stages with up to M steps in flight (microbatches)

Reported per run: wall time of the timed generate, output tokens/s, engine steps and wall
time per step; and `bubble_recovered` = 1 - t(micro) / t(serial). On CPU the ranks split
the cores (gloo between them), so the stages compete for the same cores. Needs an HF
checkpoint directory (the workers load it from disk) whose layers split over M stages.
"""
from __future__ import annotations

import os
import random
import time

from fastllm.bench.runner import write_json


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per way; the fastest is kept")
    parser.add_argument("--output-json", default=None)


def run(args) -> dict:
    from fastllm import LLM, SamplingParams
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    ways = [("pp1", 1, "1"), (f"pp{args.pp}-serial", args.pp, "0"), (f"pp{args.pp}-micro", args.pp, "1")]
    results, reference = {}, None
    for name, pp, micro in ways:
        os.environ["FASTLLM_PP_MICROBATCHES"] = micro
        llm = LLM(args.model, device=args.device, pipeline_parallel_size=pp,
                  max_model_len=args.input_len + args.output_len + 8,
                  max_num_seqs=max(args.num_prompts, 1))
        try:
            llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up
            best = None
            for _ in range(args.repeat):
                steps0 = llm.llm_engine.num_steps
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - start
                steps = llm.llm_engine.num_steps - steps0
                if best is None or wall < best[0]:
                    best = (wall, steps, [o.outputs[0].token_ids for o in outs])
        finally:
            llm.close()
        wall, steps, tokens = best
        reference = reference or tokens
        results[name] = dict(wall_s=wall, output_tok_s=args.num_prompts * args.output_len / wall,
                             steps=steps, ms_per_step=1e3 * wall / steps,
                             tokens_equal_pp1=tokens == reference)
        print(f"{name:>12}: {wall:7.2f} s  {results[name]['output_tok_s']:8.1f} tok/s  "
              f"{steps} steps  {results[name]['ms_per_step']:.1f} ms/step  "
              f"tokens == pp1: {tokens == reference}", flush=True)
    os.environ.pop("FASTLLM_PP_MICROBATCHES", None)
    serial, micro = results[ways[1][0]]["wall_s"], results[ways[2][0]]["wall_s"]
    results["bubble_recovered"] = 1 - micro / serial
    print(f"microbatches save {100 * results['bubble_recovered']:.0f}% of the serial PP time")
    if args.output_json:
        write_json(args.output_json, results)
    return results
