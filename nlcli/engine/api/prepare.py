"""A native generation request made ready for the engine: one `GenItem` in, the engine message
and the API-side `ReqState` out.

Checks token ids against the vocabulary and the prompt against the context (limits.py, the same
check the engine guards with), refuses a custom logit processor unless the server enables them,
parses and checks sampling params (a bad grammar or logprob
argument is a 400 here, never in the engine), tokenizes, and clips max_new_tokens to what fits.
Every rejection is a ValueError whose text is the 400 message.

`prepare_all` does a whole request: a text too long for the context is refused by its length
before any tokenizing, each distinct text is tokenized once (n samples share it), and big texts
and grammar checks run off the event loop so one client never delays another's health probe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from nlcli.engine.api.logprobs import LogprobAccumulator
from nlcli.engine.api.native_input import GenItem
from nlcli.engine.api.req_state import ReqState
from nlcli.engine.api.token_only import check_prompt, check_token_only
from nlcli.engine.detokenizer import IncrementalDetokenizer
from nlcli.engine.io_struct import EngineReady, TokenizedGenerateReqInput
from nlcli.engine.limits import check_input_len, check_text_len
from nlcli.engine.sampling.params import SamplingParams


def check_vocab(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if t < 0 or (vocab_size and t >= vocab_size)]
    if bad:
        raise ValueError(f"input_ids contains {bad[0]}, which is out of the vocabulary "
                         f"(size {vocab_size}).")


logger = logging.getLogger("nlcli.tokenizer_manager")

# Texts up to this many characters are tokenized on the event loop (well under a millisecond).
INLINE_TEXT_CHARS = 16384
# No token covers more characters than this (or the longest token of the vocabulary, if longer):
# the cheap bound that refuses a text too long for the context without tokenizing it.
MIN_CHARS_PER_TOKEN_BOUND = 32


def import_grammar() -> None:
    """Import xgrammar ahead of the first constrained request (run in a thread at start)."""
    try:
        import nlcli.engine.sampling.grammar  # noqa: F401
    except Exception as e:  # requests with a grammar will report it
        logger.warning("Structured output unavailable: %s", e)


def max_chars_per_token(tokenizer: Any) -> int:
    """A bound on the characters one token covers: the longest vocabulary entry (byte-level and
    SentencePiece entries are at least as long as the text they cover), at least
    MIN_CHARS_PER_TOKEN_BOUND."""
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a vocabulary listing: keep the generous default
        longest = 0
    return max(MIN_CHARS_PER_TOKEN_BOUND, longest)


async def prepare_all(items: list[GenItem], stream: bool, tokenizer: Any, ready: EngineReady,
                      context_len: int, pool_size: int, chars_per_token: int,
                      enable_custom_logit_processor: bool = False
                      ) -> list[tuple[TokenizedGenerateReqInput, ReqState]]:
    """prepare_generate for every item of one request (ValueError: the first bad one)."""
    for it in items:
        if it.text is not None and tokenizer is not None:
            check_text_len(len(it.text), context_len, chars_per_token)
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    def run() -> list[tuple[TokenizedGenerateReqInput, ReqState]]:
        return [prepare_generate(it, stream, tokenizer, ready, context_len, pool_size,
                                 enable_custom_logit_processor, encode) for it in items]

    heavy = sum(len(it.text) for it in items if it.text is not None) > INLINE_TEXT_CHARS or any(
        _has_grammar(it.sampling) for it in items)
    return await asyncio.to_thread(run) if heavy else run()


def _has_grammar(sampling: dict) -> bool:
    return any(sampling.get(k) is not None for k in ("regex", "json_schema", "ebnf"))


def check_token_ids_logprob(ids: list[int], return_logprob: bool, vocab_size: int) -> None:
    """SGLang's check (ids in [0, V)); nl also refuses the field without return_logprob, where
    SGLang would silently drop it."""
    if not return_logprob:
        raise ValueError("token_ids_logprob needs return_logprob=true.")
    for t in ids:
        if t < 0 or (vocab_size and t >= vocab_size):
            raise ValueError(f"token_ids_logprob contains out-of-vocabulary token id {t}; valid "
                             f"range is [0, {vocab_size}).")


def prepare_generate(item: GenItem, stream: bool, tokenizer: Any, ready: EngineReady,
                     context_len: int, pool_size: int, enable_custom_logit_processor: bool = False,
                     encode: Optional[Callable[[str], list[int]]] = None
                     ) -> tuple[TokenizedGenerateReqInput, ReqState]:
    """`tokenizer` is None on a --skip-tokenizer-init server (ids in, ids out, no text)."""
    if tokenizer is None:
        check_prompt(item)
    if item.custom_logit_processor:
        from nlcli.engine.sampling.custom_logit_processor import (DISABLED_MESSAGE,
                                                                  check_wire_format)

        if not enable_custom_logit_processor:
            raise ValueError(DISABLED_MESSAGE)
        check_wire_format(item.custom_logit_processor)
    if item.input_ids is not None:
        ids = item.input_ids
        check_vocab(ids, ready.vocab_size)
    else:
        ids = (encode or tokenizer.encode)(item.text)
    n = len(ids)
    check_input_len(n, context_len, pool_size)
    sp = SamplingParams.from_dict(item.sampling)
    if ready.vocab_size:
        sp.verify_token_ids(ready.vocab_size)
    if tokenizer is None:
        check_token_only(item, sp)
    if sp.grammar is not None:
        from nlcli.engine.sampling.grammar import validate_grammar

        validate_grammar(*sp.grammar)
    logprobs = None
    if item.token_ids_logprob:
        check_token_ids_logprob(item.token_ids_logprob, item.return_logprob, ready.vocab_size)
    if item.return_logprob:
        from nlcli.engine.sampling.logprobs import verify_logprob_args

        verify_logprob_args(item.logprob_start_len, item.top_logprobs_num, n)
        logprobs = LogprobAccumulator(tokenizer, item.top_logprobs_num,
                                      item.return_text_in_logprobs, item.token_ids_logprob)
    room = min(context_len, pool_size) - n - 1
    if sp.max_new_tokens is None or sp.max_new_tokens > room:
        sp.max_new_tokens = max(room, 0)
        sp.min_new_tokens = min(sp.min_new_tokens, sp.max_new_tokens)
    detok = None if tokenizer is None else IncrementalDetokenizer(
        tokenizer, ids, sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.stop,
        sp.no_stop_trim)
    msg = TokenizedGenerateReqInput(
        item.rid, list(ids), sp, stream, return_logprob=item.return_logprob,
        logprob_start_len=item.logprob_start_len, top_logprobs_num=item.top_logprobs_num,
        custom_logit_processor=item.custom_logit_processor or None,
        token_ids_logprob=item.token_ids_logprob)
    return msg, ReqState(item.rid, n, detok, stream, logprobs)
