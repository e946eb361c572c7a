"""`python -m fastllm.bench compare A.json B.json`: B/A for every numeric metric in both.

Metrics are the numeric leaves of each JSON document, named by their path
(`batching.points[8].throughput_tok_s`). A list item that carries a "label" string is
named by it (`results[gemm 512x512x512 float32].value`), so results line up across
runs even when their order or count differs. Metrics in only one file are listed apart.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Optional


def flatten_metrics(doc, prefix: str = "") -> dict:
    """{path: number} of every int/float leaf (booleans are not metrics)."""
    out: dict = {}
    if isinstance(doc, bool) or doc is None:
        return out
    if isinstance(doc, (int, float)):
        out[prefix or "value"] = doc
    elif isinstance(doc, dict):
        for key, value in doc.items():
            out.update(flatten_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            tag = value.get("label") if isinstance(value, dict) else None
            out.update(flatten_metrics(value, f"{prefix}[{tag if isinstance(tag, str) else i}]"))
    return out


def ratio(a: float, b: float) -> Optional[float]:
    """b / a; None when a is 0 (and b is not): no finite ratio exists. 0/0 is 1 (unchanged)."""
    if a == 0:
        return 1.0 if b == 0 else None
    return b / a


def compare(a_doc, b_doc) -> dict:
    """{rows: [{metric, a, b, ratio}], only_a: [...], only_b: [...]} in A's metric order."""
    a, b = flatten_metrics(a_doc), flatten_metrics(b_doc)
    rows = [{"metric": k, "a": a[k], "b": b[k], "ratio": ratio(a[k], b[k])} for k in a if k in b]
    return {"rows": rows, "only_a": [k for k in a if k not in b], "only_b": [k for k in b if k not in a]}


def format_table(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    rows = result["rows"]
    width = max([len("metric")] + [len(r["metric"]) for r in rows])
    lines = [f"{'metric':<{width}}  {name_a[-14:]:>14}  {name_b[-14:]:>14}  {'B/A':>8}",
             "-" * (width + 44)]
    for r in rows:
        rat = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        lines.append(f"{r['metric']:<{width}}  {_num(r['a']):>14}  {_num(r['b']):>14}  {rat:>8}")
    if result["only_a"]:
        lines.append(f"only in {name_a}: " + ", ".join(result["only_a"]))
    if result["only_b"]:
        lines.append(f"only in {name_b}: " + ", ".join(result["only_b"]))
    return "\n".join(lines)


def _num(x) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.6g}"


def load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"results file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path!r} is not valid JSON ({e})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A.json", help="baseline results")
    parser.add_argument("b", metavar="B.json", help="new results (ratios are B/A)")
    parser.add_argument("--json", metavar="OUT", help="also write the comparison as JSON")


def run(args: argparse.Namespace) -> dict:
    result = compare(load_json(args.a), load_json(args.b))
    if not result["rows"]:
        raise ValueError(f"{args.a} and {args.b} share no numeric metric")
    print(format_table(result, args.a, args.b))
    if args.json:
        from fastllm.bench.runner import write_json
        print(f"wrote {write_json(args.json, result)}")
    return result
