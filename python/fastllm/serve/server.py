"""`python -m fastllm.serve` / `fastllm serve MODEL`: load the model, serve it over HTTP.

    python -m fastllm.serve --model ./Llama-3-8B --port 8000 --api-key secret
    fastllm serve ./Llama-3-8B --served-model-name llama3 --max-queue-len 256

SIGINT / SIGTERM: stop accepting connections, let requests in flight finish for up to
--shutdown-grace seconds, abort the rest (each client gets an error: a 503 body, or an
error event on a stream), then exit 0. A second signal exits at once.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Optional

from fastllm import envs
from fastllm.engine.arg_utils import add_engine_args, llm_kwargs
from fastllm.serve.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("fastllm.serve")

# uvicorn's own hard stop comes this long after our grace period, as a backstop only.
_UVICORN_GRACE_MARGIN_S = 10.0


def build_parser(prog: str = "python -m fastllm.serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="fastllm's OpenAI-compatible server.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model (same as --model)")
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model` (default: the model path)")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $FASTLLM_API_KEY)")
    s.add_argument("--max-queue-len", type=int, default=None,
                   help="answer 429 while this many requests wait for their first token")
    s.add_argument("--max-request-bytes", type=int, default=8 << 20,
                   help="larger request bodies get 413")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds requests in flight may run on after SIGTERM/SIGINT")
    s.add_argument("--tool-call-parser", default="auto",
                   choices=["auto", *sorted(TOOL_PARSERS)],
                   help="how `tool_choice: auto` reads calls from the output (auto: the "
                        "format the chat template writes)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--no-access-log", action="store_true", help="no line per request")
    s.add_argument("--disable-any-whitespace", action="store_true",
                   help="structured JSON outputs without free whitespace between tokens (a "
                        "request's structured_outputs.disable_any_whitespace overrides it)")
    return p


def _check_args(args, parser) -> None:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if args.max_queue_len is not None and args.max_queue_len < 1:
        parser.error("--max-queue-len must be >= 1")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be >= 1")
    if args.shutdown_grace < 0:
        parser.error("--shutdown-grace must be >= 0")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in [0, 65535]")


def _make_server(app, args, on_signal):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but a signal starts our graceful drain and the process exits 0
        (uvicorn re-raises the signal after shutting down, which kills the process)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self._on_signal)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig, frame):
            if self.should_exit:
                self.force_exit = True
                return
            logger.info("signal %d: draining (grace %.0f s)", sig, args.shutdown_grace)
            self.should_exit = True
            on_signal()

    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_grace + _UVICORN_GRACE_MARGIN_S)
    return Server(config)


def _configure_logging(args) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fastllm")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    if args.no_access_log:
        logging.getLogger("fastllm.serve.access").setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None, prog: str = "python -m fastllm.serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(args, parser)
    _configure_logging(args)
    from fastllm.engine.async_llm import AsyncLLM
    from fastllm.serve.app import ServerConfig, create_app
    try:
        llm = AsyncLLM.from_pretrained(**llm_kwargs(args))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.served_model_name or [args.model or llm.llm.model_path]
    config = ServerConfig(served_model_names=list(names),
                          api_key=args.api_key or envs.FASTLLM_API_KEY,
                          max_queue_len=args.max_queue_len, max_body_bytes=args.max_request_bytes,
                          shutdown_grace_s=args.shutdown_grace, model_path=llm.llm.model_path,
                          tool_call_parser=args.tool_call_parser,
                          disable_any_whitespace=args.disable_any_whitespace)
    app = create_app(llm, config)
    server = _make_server(app, args, app.state.fastllm.begin_shutdown)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
