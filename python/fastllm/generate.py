"""`python -m fastllm.generate`: generate from the command line on the engine.

    python -m fastllm.generate --prompt "The capital of France is"         # default model
    python -m fastllm.generate --model ./Llama-3-8B --prompt "..." --max-tokens 64 --temperature 0.7
    python -m fastllm.generate --model m.gguf --prompts-file prompts.txt --chat --stats

One prompt streams its tokens to the terminal as they are sampled; several prompts
print one result each when all are done. Throughput (generated tokens/s) comes last.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Optional

from fastllm.engine.arg_utils import add_engine_args, llm_kwargs
from fastllm.engine.stats import format_kv_report, track_kv_peak
from fastllm.sampling_params import SamplingParams

# Where neither a flag nor the checkpoint's generation_config.json says otherwise.
CLI_DEFAULTS = {"temperature": 0.0, "max_tokens": 128}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other
    user mistake here; --help still prints the full usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m fastllm.generate",
                       description="Generate text with fastllm's engine.")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate per prompt (default: generation_config's, else 128)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config's, else 0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print engine statistics at the end")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")
    add_engine_args(p)
    return p


def read_prompts(args, parser) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            parser.error(f"--prompts-file {args.prompts_file!r}: {e.strerror}")
        except UnicodeDecodeError as e:
            parser.error(f"--prompts-file {args.prompts_file!r} is not UTF-8 text "
                         f"({e.reason} at byte {e.start})")
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    return prompts


def sampling_params(args, llm) -> SamplingParams:
    """Flags first, then the checkpoint's generation_config.json (LLM.default_sampling_params),
    then CLI_DEFAULTS (greedy, 128 tokens)."""
    flags = {"max_tokens": args.max_tokens, "temperature": args.temperature,
             "top_p": args.top_p, "top_k": args.top_k}
    checkpoint = llm.generation_defaults()
    overrides = {k: v for k, v in CLI_DEFAULTS.items() if k not in checkpoint}
    overrides.update((k, v) for k, v in flags.items() if v is not None)
    return llm.default_sampling_params(**overrides)


# Errors that are the user's (a bad flag value, file or model): one line, exit 2. At load
# time RuntimeError is one too (no default model without network, a model too big).
_USER_ERRORS = (ValueError, OSError)
_LOAD_ERRORS = _USER_ERRORS + (RuntimeError,)


def _report(error: Exception, args, user_errors: tuple) -> int:
    """One line on stderr: exit 2 for a user mistake, 1 for an internal error; --debug
    re-raises (the traceback)."""
    if args.debug:
        raise error
    if isinstance(error, user_errors):
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(f"internal error: {type(error).__name__}: {_one_line(error)} "
          f"(run with --debug for the traceback)", file=sys.stderr)
    return 1


def _check_sampling_flags(args) -> None:
    """The sampling flags alone, before the model loads (a bad one fails in a moment)."""
    flags = {"max_tokens": args.max_tokens, "temperature": args.temperature,
             "top_p": args.top_p, "top_k": args.top_k}
    SamplingParams(**{k: v for k, v in flags.items() if v is not None})


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: 0 done, 2 a user mistake (one line on stderr), 1 an internal error
    (one line; --debug shows the traceback of either), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fastllm.llm import LLM

    try:
        _check_sampling_flags(args)
        llm = LLM(**llm_kwargs(args))
        params = sampling_params(args, llm)
    except Exception as e:
        return _report(e, args, _LOAD_ERRORS)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    try:     # a model without a chat template cannot take --chat
        inputs = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
                  for p in prompts]
    except Exception as e:
        return _report(e, args, _USER_ERRORS)

    start = time.perf_counter()
    num_tokens = 0
    # --stats: the KV report is taken at the fullest step (a finished run holds no KV).
    # (One engine only: data-parallel replicas keep their KV in their own processes.)
    track_kv = args.stats and hasattr(engine, "block_manager")
    kv_peak = track_kv_peak(engine) if track_kv else contextlib.nullcontext()
    try:
        with kv_peak as kv_tracker:
            num_tokens = _run(llm, inputs, prompts, params, args.chat)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return _report(e, args, _USER_ERRORS)
    elapsed = time.perf_counter() - start
    print(f"\n{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / max(elapsed, 1e-9):.1f} tokens/s")
    if args.stats:
        print(engine.get_stats().format())
        if track_kv:
            print(format_kv_report(kv_tracker.report()))
    return 0


def _run(llm, inputs, prompts, params: SamplingParams, chat: bool) -> int:
    """Stream a single prompt; print several prompts' results as they finish together."""
    if len(inputs) == 1:
        return _stream_one(llm.llm_engine, inputs[0], prompts[0], params, chat)
    num_tokens = 0
    outs = llm.generate(inputs, params, use_tqdm=sys.stderr.isatty())
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        completion = out.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"=== [{i}] {prompt}")
        print(completion.text)
        print(f"--- finish_reason={completion.finish_reason}, {len(completion.token_ids)} tokens")
    return num_tokens


def _stream_one(engine, prompt, prompt_text: str, params: SamplingParams, chat: bool) -> int:
    """Print the completion piece by piece as the engine produces it."""
    if not chat:
        print(prompt_text, end="", flush=True)
    engine.add_request("cli-0", prompt, params, delta=True)
    num_tokens, finish = 0, None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                piece = out.outputs[0]
                num_tokens += len(piece.token_ids)
                if piece.text:
                    print(piece.text, end="", flush=True)
                finish = piece.finish_reason or finish
    except BaseException:
        engine.abort_request("cli-0")
        raise
    print(flush=True)
    print(f"--- finish_reason={finish}", file=sys.stderr)
    return num_tokens


if __name__ == "__main__":
    sys.exit(main())
