"""A native generation request made ready for the engine: one `GenItem` in, the engine message
and the API-side `ReqState` out.

Checks token ids against the vocabulary and the prompt against the context (limits.py, the same
check the engine guards with), refuses a custom logit processor unless the server enables them,
parses and checks sampling params (a bad grammar or logprob
argument is a 400 here, never in the engine), tokenizes, and clips max_new_tokens to what fits.
Every rejection is a ValueError whose text is the 400 message.
"""

from __future__ import annotations

from typing import Any

from nlcli.engine.api.logprobs import LogprobAccumulator
from nlcli.engine.api.native_input import GenItem
from nlcli.engine.api.req_state import ReqState
from nlcli.engine.api.token_only import check_prompt, check_token_only
from nlcli.engine.detokenizer import IncrementalDetokenizer
from nlcli.engine.io_struct import EngineReady, TokenizedGenerateReqInput
from nlcli.engine.limits import check_input_len
from nlcli.engine.sampling.params import SamplingParams


def check_vocab(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if t < 0 or (vocab_size and t >= vocab_size)]
    if bad:
        raise ValueError(f"input_ids contains {bad[0]}, which is out of the vocabulary "
                         f"(size {vocab_size}).")


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
                     context_len: int, pool_size: int, enable_custom_logit_processor: bool = False
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
        ids = tokenizer.encode(item.text)
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
