"""Turning scheduled requests into a ForwardBatch, and a batch's logits into next tokens.

`prepare_extend` gives each request a req_to_token row and KV slots for its `fill_ids[prefix_len:]`
and writes them into `req_to_token[row, prefix_len:seq_len]` (in a mixed batch, running requests'
decode tokens follow); `prepare_decode` adds one slot per running request. `sample_next_ids` runs
the batched sampler over logits that are already exactly `[bs, vocab_size]` (the logits processor
is the one place that slices to the vocabulary); `sample_each` falls back to one request at a time
when the batched pass raises.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.sampling.sampler import (INVALID_TOKEN, CustomProcessorRow, SampleOutput,
                                           SamplingBatchInfo)
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.req import Req


def prepare_extend(mem: KVMemory, reqs: list[Req], decoding: Sequence[Req] = ()) -> ForwardBatch:
    """Rows and slots for each request's `fill_ids[prefix_len:]`; returns the forward batch.
    `decoding` (a mixed batch): running requests that add their last sampled token in the same
    forward, after the extends (their logits rows follow the extends' rows)."""
    need_rows = [r for r in reqs if r.req_pool_idx is None]
    if need_rows:
        rows = mem.alloc_rows(len(need_rows))
        if rows is None:
            raise RuntimeError("req_to_token pool exhausted (max_running_requests too high)")
        for r, row in zip(need_rows, rows):
            r.req_pool_idx = int(row)
    total = sum(r.extend_len for r in reqs) + len(decoding)
    out_cache_loc = mem.alloc_slots(total)
    if out_cache_loc is None:
        raise RuntimeError(f"KV pool cannot hold {total} new tokens")
    r2t = mem.req_to_token
    start = 0
    for r in reqs:
        row, pre, ext = r.req_pool_idx, r.prefix_len, r.extend_len
        if pre:
            r2t[row, :pre] = r.prefix_indices.to(r2t.device)
        r2t[row, pre: pre + ext] = out_cache_loc[start: start + ext].to(r2t.device)
        r.kv_len = pre + ext
        start += ext
    decode_lens = _add_decode_slots(mem, decoding, out_cache_loc[start:]) if decoding else []
    fb = ForwardBatch.create(
        input_ids=([r.fill_ids[r.prefix_len:] for r in reqs]
                   + [[r.output_ids[-1]] for r in decoding]),
        prefix_lens=[r.prefix_len for r in reqs] + decode_lens,
        req_pool_indices=[r.req_pool_idx for r in reqs] + [r.req_pool_idx for r in decoding],
        out_cache_loc=out_cache_loc,
        device=mem.device,
        return_all_logits=any(r.return_all_logits for r in reqs),
    )
    if any(r.token_type_ids is not None for r in reqs):  # cross-encoder pairs (whole inputs)
        types = [t for r in reqs
                 for t in (r.token_type_ids or [0] * len(r.fill_ids))[r.prefix_len:len(r.fill_ids)]]
        fb.token_type_ids = torch.tensor(types, dtype=torch.int64, device=fb.input_ids.device)
    return fb


def prepare_decode(mem: KVMemory, reqs: list[Req]) -> ForwardBatch:
    """One new slot per running request for its last sampled token."""
    out_cache_loc = mem.alloc_slots(len(reqs))
    if out_cache_loc is None:
        raise RuntimeError("KV pool cannot hold one decode step (retraction should have run)")
    return ForwardBatch.create(
        input_ids=[[r.output_ids[-1]] for r in reqs],
        prefix_lens=_add_decode_slots(mem, reqs, out_cache_loc),
        req_pool_indices=[r.req_pool_idx for r in reqs],
        out_cache_loc=out_cache_loc,
        device=mem.device,
    )


def _add_decode_slots(mem: KVMemory, reqs: Sequence[Req], loc: torch.Tensor) -> list[int]:
    """Write one new slot per request at column kv_len of its row; returns the old kv_lens (the
    prefix each decode token attends over besides itself)."""
    r2t = mem.req_to_token
    lens = [r.kv_len for r in reqs]
    rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=r2t.device)
    cols = torch.tensor(lens, dtype=torch.int64, device=r2t.device)
    r2t[rows, cols] = loc.to(r2t.device)
    for r in reqs:
        r.kv_len += 1
        r.fill_ids = r.all_ids
    return lens


def sample_next_ids(logits: torch.Tensor, reqs: list[Req], vocab_size: int,
                    eos_token_ids=()) -> SampleOutput:
    """Next token per request through the batched sampler (penalties, grammar masks, top-k/p,
    min_p, seeds), with raw logprobs when any request asked for them. `logits` is
    `[len(reqs), vocab_size]`, row i for reqs[i]."""
    return _sample(logits, reqs, vocab_size, eos_token_ids, any(r.return_logprob for r in reqs))


def sample_each(logits: torch.Tensor, reqs: list[Req], vocab_size: int,
                eos_token_ids=()) -> tuple[SampleOutput, dict[int, str]]:
    """`sample_next_ids`, and should the batched pass raise, each request alone, so that one
    request's failure stays its own. Returns the output (`INVALID_TOKEN` in the rows that raised)
    and {row: why} for those rows."""
    try:
        return sample_next_ids(logits, reqs, vocab_size, eos_token_ids), {}
    except Exception:  # noqa: BLE001 - which request caused it is found below
        pass
    want_logprobs = any(r.return_logprob for r in reqs)
    parts, errors = [], {}
    for i, r in enumerate(reqs):
        try:
            parts.append(_sample(logits[i: i + 1], [r], vocab_size, eos_token_ids, want_logprobs))
        except Exception as e:  # noqa: BLE001 - reported to that request's client
            errors[i] = f"{type(e).__name__}: {e}"
            parts.append(_failed_row(logits, want_logprobs))
    ids = torch.cat([p.next_token_ids for p in parts])
    # A client's logit processor that raised in its own row still ends only its request (400).
    rejected = {i: msg for i, p in enumerate(parts) for msg in (p.failed_rows or {}).values()}
    if not want_logprobs:
        return SampleOutput(ids, failed_rows=rejected or None), errors
    return SampleOutput(ids, torch.cat([p.next_token_logprobs for p in parts]),
                        torch.cat([p.logprobs for p in parts]), rejected or None), errors


def _sample(logits: torch.Tensor, reqs: list[Req], vocab_size: int, eos_token_ids,
            return_logprobs: bool) -> SampleOutput:
    if logits.shape[-1] != vocab_size:  # a host-side shape check: no device sync
        raise ValueError(f"logits have {logits.shape[-1]} columns, the vocabulary {vocab_size}")
    info = SamplingBatchInfo.from_reqs(
        [(r.sampling_params, r.output_ids, r.origin_input_ids) for r in reqs],
        vocab_size, logits.device, eos_token_ids=list(eos_token_ids),
        grammars=[r.grammar for r in reqs], processors=[_processor_row(r) for r in reqs])
    return info.sample(logits, return_logprobs=return_logprobs)


def _processor_row(req: Req) -> Optional[CustomProcessorRow]:
    """A request's custom logit processor for the sampler; its custom_params gain SGLang's
    "__req__" (a weak proxy to the request, for processors that read its tokens)."""
    if req.logit_processor is None:
        return None
    params = req.sampling_params.custom_params
    if isinstance(params, dict):
        params = {**params, "__req__": weakref.proxy(req)}
    return req.custom_logit_processor, req.logit_processor, params


def _failed_row(logits: torch.Tensor, with_logprobs: bool) -> SampleOutput:
    ids = torch.full((1,), INVALID_TOKEN, dtype=torch.int64, device=logits.device)
    if not with_logprobs:
        return SampleOutput(ids)
    nan = torch.full((1, logits.shape[-1]), float("nan"), device=logits.device)
    return SampleOutput(ids, nan[:, 0], nan)
