"""Structured output through xgrammar: regex, JSON schema and EBNF constraints.

`validate_grammar(kind, text)` checks the text without a tokenizer (the API process calls it so a bad
grammar is a 400, never a silent unconstrained run). `GrammarBackend` lives in the engine process:
it compiles against the model's tokenizer on a thread pool, caches by (kind, text), and hands out a
per-request `GrammarMatcher` that fills a token bitmask, accepts tokens and says when it is done.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)

KINDS = ("regex", "json_schema", "ebnf")
# xgrammar prefixes errors with "[time] /path/file.cc:line: " and sometimes "Check failed: ...: ".
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed:.*?is false:\s*)?")


def _clean(err: Exception) -> str:
    return _NATIVE_PREFIX.sub("", str(err).strip()).strip()


def _parse(kind: str, text: str) -> "xgr.Grammar":
    """The tokenizer-free grammar for (kind, text); ValueError with a clear message when invalid."""
    if kind not in KINDS:
        raise ValueError(f"Unknown grammar kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Invalid json_schema: not valid JSON ({e}).") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("Invalid json_schema: a schema must be a JSON object.")
    try:
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "json_schema":
            # Compact whitespace: a small model given free whitespace can loop on newlines forever.
            return xgr.Grammar.from_json_schema(text, any_whitespace=False)
        return xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"Invalid {kind}: {_clean(e)}") from None


def validate_grammar(kind: str, text: str) -> None:
    """Raise ValueError (the 400 message) when `text` is not a valid `kind` constraint."""
    _parse(kind, text)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, compiled: "xgr.CompiledGrammar", stop_token_ids: Sequence[int] = ()):
        self._m = xgr.GrammarMatcher(compiled)
        self._stop_token_ids = list(stop_token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an xgrammar bitmask (CPU int32)."""
        if self._m.is_terminated():
            # xgrammar refuses to fill once done; a request kept going (ignore_eos) may only stop.
            bitmask[row] = 0
            for tid in self._stop_token_ids:
                word = int(bitmask[row, tid // 32]) & 0xFFFFFFFF | (1 << (tid % 32))
                bitmask[row, tid // 32] = word - (1 << 32) if word >= 1 << 31 else word
            return
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (the request should abort)."""
        if self._m.is_terminated():
            return False
        return self._m.accept_token(int(token_id))

    def is_terminated(self) -> bool:
        """True once the grammar is complete and its stop token was accepted."""
        return self._m.is_terminated()

    def is_completed(self) -> bool:
        """True when the text so far is a full match (only a stop token may follow, or more text)."""
        return self._m.is_completed()


class GrammarBackend:
    """Compiles constraints for one tokenizer off the step loop, with an LRU cache of results."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int] = (),
        max_workers: int = 2,
        cache_size: int = 256,
    ):
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids) or None
        )
        # xgrammar's own cache is off: ours keys by (kind, text) and also remembers failures.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, kind: str, text: str) -> Future:
        """A future of the CompiledGrammar; its result() raises ValueError for an invalid grammar.

        The scheduler keeps a request with a pending future out of the batch until `done()`, so a
        slow compile delays only that request.
        """
        key = (kind, text)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, kind, text)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, kind: str, text: str) -> "xgr.CompiledGrammar":
        grammar = _parse(kind, text)
        try:
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            logger.warning("grammar compile failed for %s: %s", kind, _clean(e))
            raise ValueError(f"Invalid {kind}: {_clean(e)}") from None

    def matcher(self, compiled: "xgr.CompiledGrammar") -> GrammarMatcher:
        return GrammarMatcher(compiled, self.tokenizer_info.stop_token_ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fill_grammar_bitmask(
    grammars: Sequence[Optional[GrammarMatcher]], vocab_size: int
) -> tuple[torch.Tensor, list[int]]:
    """The batch's bitmask (CPU) and the rows that have a grammar.

    Split from applying so a scheduler may fill it while the model forward runs.
    """
    rows = [i for i, g in enumerate(grammars) if g is not None]
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)
    return bitmask, rows


def apply_grammar_masks(
    logits: torch.Tensor,
    grammars: Sequence[Optional[GrammarMatcher]],
    bitmask: Optional[torch.Tensor] = None,
) -> None:
    """In place: disallowed tokens of constrained rows get -inf."""
    vocab_size = logits.shape[-1]
    if bitmask is None:
        bitmask, rows = fill_grammar_bitmask(grammars, vocab_size)
    else:
        rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab_size, indices=rows
    )
