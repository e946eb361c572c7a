"""Child process of test_fuzz_files.py: loads hostile files, one JSON line per step.

stdin: a JSON list of cases {"name", "path", "calls": ["load_model" | "tokenizer", ...]}.
stdout: {"case", "call", "started": true} before each call (so the parent can name the
call that hung or was killed), then {"case", "call", "outcome", "message"}, where
outcome is "ok" or the exception's type name, and peak_rss_mib the process's peak
resident memory so far. The parent runs this under a memory cap
and a timeout; nothing here catches more than an ordinary Exception, so a crash or
MemoryError shows as a missing result line.
"""
import json
import resource
import sys


def _call(name: str, path: str) -> None:
    if name == "load_model":
        from fastllm.model.loader import load_model
        load_model(path)
    elif name == "tokenizer":
        from fastllm.tokenizer import Tokenizer
        Tokenizer.from_pretrained(path)
    else:
        raise AssertionError(f"unknown call {name!r}")


def main() -> None:
    import fastllm.model.loader  # noqa: F401  (import cost before the first case)
    for case in json.load(sys.stdin):
        for call in case["calls"]:
            print(json.dumps({"case": case["name"], "call": call, "started": True}), flush=True)
            try:
                _call(call, case["path"])
                outcome, message = "ok", ""
            except Exception as e:  # the parent asserts the type
                outcome, message = type(e).__name__, str(e)
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(json.dumps({"case": case["name"], "call": call, "outcome": outcome,
                              "message": message, "peak_rss_mib": peak_mib}), flush=True)


if __name__ == "__main__":
    main()
