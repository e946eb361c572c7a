"""The `fastllm` console script: `fastllm serve MODEL ...`, `fastllm generate ...`.

Each subcommand is its module's own command line (`fastllm serve X` is
`python -m fastllm.serve --model X`), so the flags are defined once.
"""
from __future__ import annotations

import sys
from typing import Optional

_USAGE = """usage: fastllm {serve,generate} ...

  serve MODEL [flags]   OpenAI-compatible HTTP server (python -m fastllm.serve --help)
  generate [flags]      generate from the command line (python -m fastllm.generate --help)
"""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from fastllm.serve.server import main as serve_main
        return serve_main(rest, prog="fastllm serve")
    if command == "generate":
        from fastllm.generate import main as generate_main
        return generate_main(rest)
    print(f"fastllm: unknown command {command!r}\n{_USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
