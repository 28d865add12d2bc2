"""Logprobs on the engine side: what a request asked for, gathered as the scheduler runs it.

Prompt logprobs come from an extend's all-token logits, chunk by chunk (a chunked prompt yields its
rows over several forwards); output logprobs come from each sampling step's raw log-softmax. Both
stay on the `Req` as floats and ids; `logprob_delta` hands the API process what it has not seen
yet, and the API process builds the `[logprob, id, text]` triples (api/logprobs.py).
Position convention (API_SPEC 2.1): the logits row at prompt position i predicts prompt token i+1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nlcli.engine.io_struct import LogprobDelta
from nlcli.engine.sampling.logprobs import (ids_logprobs, input_logprob_rows, token_logprobs,
                                            top_logprobs_of)
from nlcli.engine.sampling.sampler import SampleOutput
from nlcli.engine.scheduler.req import Req


def collect_input_logprobs(reqs: Sequence[Req], extend_lens: Sequence[int],
                           all_logits: Optional[torch.Tensor]) -> None:
    """After an extend: take each request's prompt rows out of `all_logits` ([num_tokens, vocab],
    requests concatenated in batch order). Call before a chunk is cached (prefix_len moves)."""
    offset = 0
    for req, ext in zip(reqs, extend_lens):
        if req.needs_input_logprobs:
            if all_logits is None:  # a runner without all-token logits: fail the request only
                req.input_token_logprobs = []
                req.finish_abort("This model runner cannot return prompt logprobs.", 400)
            else:
                _add_rows(req, all_logits[offset: offset + ext], req.prefix_len)
        offset += ext


def _add_rows(req: Req, logits: torch.Tensor, start: int) -> None:
    prompt = req.origin_input_ids
    first, last = input_logprob_rows(len(prompt), req.logprob_start_len)
    end = start + logits.shape[0]
    lo, hi = max(first, start), min(last, end)
    if lo < hi:
        lps, tops = token_logprobs(logits[lo - start: hi - start], prompt[lo + 1: hi + 1],
                                   req.top_logprobs_num)
        req.input_lp_acc.extend(lps)
        req.input_top_acc.extend(tops or [])
        if req.token_ids_logprob:
            req.input_ids_acc.extend(ids_logprobs(logits[lo - start: hi - start],
                                                  req.token_ids_logprob))
    if end >= last:
        _finalize_input(req, first, last)


def _finalize_input(req: Req, first: int, last: int) -> None:
    prompt = req.origin_input_ids
    pairs: list = list(zip(req.input_lp_acc, prompt[first + 1: last + 1]))
    tops: list = list(req.input_top_acc)
    # SGLang's alignment: P - k entries for prompt positions k .. P-1, the first with a null
    # logprob (k == 0: no context to predict it from; k > 0: its row is not computed).
    pairs.insert(0, (None, prompt[first]))
    tops.insert(0, None)
    req.input_token_logprobs = pairs
    req.input_top_logprobs = tops if req.top_logprobs_num > 0 else None
    if req.token_ids_logprob:
        req.input_token_ids_logprobs = [None] + req.input_ids_acc
    req.input_lp_acc, req.input_top_acc, req.input_ids_acc = [], [], []


def collect_output_logprobs(reqs: Sequence[Req], out: SampleOutput,
                            rows: Optional[Sequence[int]] = None) -> None:
    """After a sampling step (run with return_logprobs): one entry per request that asked.
    `rows[j]` is reqs[j]'s row of `out` (default j)."""
    rows = list(range(len(reqs))) if rows is None else list(rows)
    want = [j for j, r in enumerate(reqs) if r.return_logprob]
    if not want:
        return
    chosen = out.next_token_logprobs.tolist()
    top_js = [j for j in want if reqs[j].top_logprobs_num > 0]
    tops = top_logprobs_of(out.logprobs, [rows[j] for j in top_js],
                           [reqs[j].top_logprobs_num for j in top_js])
    top_of = dict(zip(top_js, tops))
    for j in want:
        req = reqs[j]
        req.output_token_logprobs.append(chosen[rows[j]])
        if j in top_of:
            req.output_top_logprobs.append(top_of[j])
        if req.token_ids_logprob:
            req.output_token_ids_logprobs.append(
                ids_logprobs(out.logprobs[rows[j]: rows[j] + 1], req.token_ids_logprob)[0])


def collect_scoring_logprobs(reqs: Sequence[Req], logits: torch.Tensor,
                             rows: Sequence[int]) -> None:
    """max_new_tokens == 0 samples nothing, yet token_ids_logprob still reports the next-token
    distribution after the prompt (one output entry, as SGLang; /v1/score reads it)."""
    for req, row in zip(reqs, rows):
        if req.max_new_tokens == 0 and req.token_ids_logprob:
            req.output_token_ids_logprobs = ids_logprobs(logits[row: row + 1],
                                                         req.token_ids_logprob)


def logprob_delta(req: Req) -> Optional[LogprobDelta]:
    """What the API process has not seen: output entries past `num_sent`, the input ones once."""
    if not req.return_logprob:
        return None
    n = req.num_sent
    delta = LogprobDelta(
        output_token_logprobs=req.output_token_logprobs[n:],
        output_top_logprobs=req.output_top_logprobs[n:] if req.top_logprobs_num > 0 else None,
        output_token_ids_logprobs=(req.output_token_ids_logprobs[n:] if req.token_ids_logprob
                                   else None))
    if not req.input_logprobs_sent and (req.input_token_logprobs is not None
                                        or req.logprob_start_len < 0 or req.finished):
        delta.input_token_logprobs = list(req.input_token_logprobs or [])
        if req.top_logprobs_num > 0:
            delta.input_top_logprobs = list(req.input_top_logprobs or [])
        if req.token_ids_logprob:
            delta.input_token_ids_logprobs = list(req.input_token_ids_logprobs or [])
        req.input_logprobs_sent = True
    return delta
