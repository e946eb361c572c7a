"""StructuredOutputManager: the engine-side owner of every grammar.

    engine.add_request  -> submit(params): parse now (ValueError), compile in the pool
    Scheduler (waiting) -> grammar_for(request): None until compiled, then a fresh matcher
                           (the scheduler skips the request until then: no step waits)
    Scheduler._finish   -> fill_bitmask(grammars): the constrained rows' next-token masks,
                           CPU int32, carried to the runner in SchedulerOutput
    Scheduler._append   -> grammar.accept_token(t) after sampling; terminated = finished

Compiled grammars are cached by grammar key (LRU, bounded), so a schema sent by many
requests is compiled once; a request arriving while its key compiles shares the future.
The compiler (the tokenizer's vocabulary as xgrammar sees it) is built on the first
compile, in the pool, so an engine that never sees a constrained request never pays it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fastllm.sampling_params import StructuredOutputsParams
from fastllm.structured.grammar import StructuredOutputGrammar

logger = logging.getLogger(__name__)

_MAX_CACHED_GRAMMARS = 256


@dataclass
class StructuredOutputRequest:
    """A request's constraint: its key and the compilation every request of that key shares."""
    key: tuple
    future: concurrent.futures.Future      # -> xgrammar CompiledGrammar

    @property
    def is_ready(self) -> bool:
        return self.future.done()


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, max_workers: int = 2):
        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.bitmask_width = (self.vocab_size + 31) // 32      # 32 token bits per int32 word
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="fastllm-grammar")
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._batch_filler = None        # xgrammar BatchGrammarMatcher, made on first use

    def submit(self, params: StructuredOutputsParams) -> StructuredOutputRequest:
        """Validate params' schema / regex / grammar (ValueError naming it) and start its
        compilation unless its key is cached or compiling."""
        backend = _backend()
        key = backend.grammar_key(params)
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            return StructuredOutputRequest(key, future)
        grammar = backend.parse_grammar(params)
        future = self._pool.submit(self._compile, grammar)
        self._cache[key] = future
        while len(self._cache) > _MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)      # in-flight requests keep their own future
        return StructuredOutputRequest(key, future)

    def _compile(self, grammar):
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = _backend().make_compiler(self.tokenizer, self.vocab_size)
        return self._compiler.compile_grammar(grammar)

    def grammar_for(self, request: StructuredOutputRequest) -> Optional[StructuredOutputGrammar]:
        """A new matcher at the grammar's start, or None while it still compiles. A failed
        compilation (parsing succeeded, so only resource errors) raises RuntimeError."""
        if not request.future.done():
            return None
        try:
            compiled = request.future.result()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"grammar compilation failed: {e}") from e
        return StructuredOutputGrammar(_backend().new_matcher(compiled))

    @property
    def has_pending(self) -> bool:
        return any(not f.done() for f in self._cache.values())

    def wait_for_pending(self, timeout: float) -> None:
        """Block up to timeout seconds until a compiling grammar is done (an engine with
        nothing else to run waits here instead of spinning)."""
        pending = [f for f in self._cache.values() if not f.done()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def fill_bitmask(self, grammars: list[StructuredOutputGrammar]) -> np.ndarray:
        """[len(grammars), ceil(vocab/32)] int32: row i = the tokens grammars[i] allows next.
        Several rows are filled by xgrammar's batch filler (its threads, half the cores)."""
        bitmask = np.full((len(grammars), self.bitmask_width), -1, dtype=np.int32)
        if len(grammars) == 1:
            grammars[0].fill_bitmask(bitmask, 0)
            return bitmask
        if self._batch_filler is None:
            self._batch_filler = _backend().batch_filler()
        self._batch_filler.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
        return bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _backend():
    # Imported on first use: xgrammar (and what it imports) costs seconds, which an engine
    # that never sees a constrained request should not pay.
    try:
        from fastllm.structured import xgrammar_backend
    except ImportError as e:      # a --no-deps install (the GPU machines have no registry)
        raise RuntimeError(f"structured outputs need the xgrammar package ({e}); "
                           f"pip install 'xgrammar>=0.2.8'") from e
    return xgrammar_backend
