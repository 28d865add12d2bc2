"""Requests with a regex / JSON schema / EBNF constraint, from arrival to a ready matcher, and the
per-step advance of their matchers.

Compilation never runs on the step loop: the xgrammar backend itself is built on a helper thread
the first time a constrained request arrives (building the tokenizer info takes a while), and each
grammar compiles on the backend's thread pool (cached by kind and text). A request waits here until
its matcher is ready while the rest of the batch keeps running; a grammar that fails to compile
finishes its request with a 400 abort.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from nlcli.engine.scheduler.req import Req

logger = logging.getLogger("nlcli.scheduler")


class GrammarQueue:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int,
                 eos_token_ids: Sequence[int]):
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._boot: Optional[Future] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self.pending: list[Req] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, req: Req) -> None:
        if self._boot is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-init")
            self._boot = self._pool.submit(self._make_backend)
        self.pending.append(req)

    def remove(self, req: Req) -> bool:
        if req in self.pending:
            self.pending.remove(req)
            return True
        return False

    def _make_backend(self):
        from nlcli.engine.sampling.grammar import GrammarBackend

        return GrammarBackend(self._load_tokenizer(), self._vocab_size, self._eos)

    def poll(self) -> tuple[list[Req], list[tuple[Req, str]]]:
        """Requests whose matcher is now ready, and (request, message) for those that failed."""
        if not self.pending or not self._boot.done():
            return [], []
        try:
            backend = self._boot.result()
        except Exception as e:  # e.g. a tokenizer xgrammar cannot read
            logger.error("Grammar backend failed to start: %s", e)
            failed = [(r, f"Structured output is unavailable: {e}") for r in self.pending]
            self.pending = []
            return [], failed
        ready, failed, still = [], [], []
        for req in self.pending:
            if req.grammar_future is None:
                req.grammar_future = backend.compile(*req.sampling_params.grammar)
            fut = req.grammar_future
            if not fut.done():
                still.append(req)
                continue
            req.grammar_future = None
            try:
                req.grammar = backend.matcher(fut.result())
            except ValueError as e:
                failed.append((req, str(e)))
            except Exception as e:
                failed.append((req, f"Grammar compilation failed: {e}"))
            else:
                ready.append(req)
        self.pending = still
        return ready, failed

    def admit(self, finish: Callable[[list[Req]], None]) -> list[Req]:
        """`poll`, then end the failed requests with a 400 abort (`finish` reports them); returns
        the ready ones, for the waiting queue."""
        ready, failed = self.poll()
        for req, message in failed:
            req.finish_abort(message, status_code=400)
        if failed:
            finish([r for r, _ in failed])
        return ready


def advance_grammars(reqs: Sequence[Req], next_ids: Sequence[int]) -> None:
    """Feed each unfinished constrained request its sampled token (after the length/EOS checks).

    A terminated grammar allowed only stop tokens, so its request is done whatever ignore_eos says.
    """
    for req, tok in zip(reqs, next_ids):
        g = req.grammar
        if g is None or req.finished:
            continue
        if g.is_terminated():
            req.finished_reason = {"type": "stop", "matched": int(tok)}
        elif not g.accept_token(tok):
            # The bitmask should make this impossible; never emit text the grammar refuses.
            req.finish_abort(f"The grammar rejected token {tok}.")
        elif g.is_terminated():
            req.finished_reason = {"type": "stop", "matched": int(tok)}
