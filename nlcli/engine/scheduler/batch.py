"""ScheduleBatch: turning scheduled requests into a ForwardBatch, and handing their memory back.

Owns the per-request memory plan: a req_to_token row per request, KV slots for every new token
(evicting unlocked radix leaves when the allocator runs short), the writes into
`req_to_token[row, prefix_len:seq_len]`, and, when a request finishes, is chunked or is retracted,
inserting what it computed into the radix cache and freeing the rest.
"""

from __future__ import annotations

from typing import Optional

import torch

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.mem_cache.radix_cache import RadixCache
from nlcli.engine.scheduler.req import Req
from nlcli.engine.sampling.sampler import SampleOutput, SamplingBatchInfo


class KVMemory:
    """The scheduler's view of the runner's pools plus the radix cache that sits on them."""

    def __init__(self, runner, tree: RadixCache):
        self.req_to_token_pool = runner.req_to_token_pool
        self.allocator = runner.token_to_kv_pool_allocator
        self.tree = tree
        self.device = getattr(runner, "device", "cpu")

    @property
    def size(self) -> int:
        return int(self.allocator.size)

    def available(self) -> int:
        return int(self.allocator.available_size()) + self.tree.evictable_size()

    def reset(self) -> None:
        """Forget every slot, row and cached prefix at once. Only safe when no request holds any
        (after a failed step has failed every request in flight)."""
        self.tree.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()

    def used(self) -> int:
        """Slots not free and not merely cached: held by running requests or locked by them."""
        return self.size - int(self.allocator.available_size()) - self.tree.evictable_size()

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        short = n - int(self.allocator.available_size())
        if short > 0:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    # ---- requests ------------------------------------------------------------------------
    def lock_prefix(self, req: Req, ids: list[int]) -> None:
        """Match the cacheable head of `ids` (see `Req.max_prefix_match`) and lock it."""
        prefix, node = self.tree.match_prefix(ids[: min(len(ids) - 1, req.max_prefix_match)])
        self.tree.inc_lock_ref(node)
        req.prefix_indices, req.last_node = prefix, node

    def unlock_prefix(self, req: Req) -> None:
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = None
        req.prefix_indices = torch.empty((0,), dtype=torch.int64)

    def release(self, req: Req) -> None:
        """Give back everything `req` holds; what it computed stays in the tree as evictable."""
        if req.req_pool_idx is None:
            self.unlock_prefix(req)
            return
        row = req.req_pool_idx
        kv = self.req_to_token_pool.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        own_from = req.prefix_len
        if self.tree.disable:
            self.allocator.free(kv)  # nothing is shared without a tree
        else:
            ids = req.all_ids[: req.kv_len]
            shared = self.tree.insert(ids, kv)
            # Slots past our locked prefix that the tree already had: our copies are duplicates.
            if shared > own_from:
                self.allocator.free(kv[own_from:shared])
        self.unlock_prefix(req)
        self.req_to_token_pool.free([row])
        req.req_pool_idx = None
        req.kv_len = 0
        req.fill_ids = []

    def cache_chunk(self, req: Req) -> None:
        """After a non-final prefill chunk: put the chunk in the tree and lock it as the prefix."""
        row = req.req_pool_idx
        req.kv_len = len(req.fill_ids)
        if self.tree.disable:
            req.prefix_indices = self.req_to_token_pool.req_to_token[row, : req.kv_len].to(
                "cpu", torch.int64)
            return
        kv = self.req_to_token_pool.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        old_len = req.prefix_len
        shared = self.tree.insert(req.fill_ids, kv)
        if shared > old_len:
            self.allocator.free(kv[old_len:shared])
        new_prefix, new_node = self.tree.match_prefix(req.fill_ids)
        self.req_to_token_pool.req_to_token[row, old_len: len(new_prefix)] = new_prefix[old_len:].to(
            self.req_to_token_pool.req_to_token.device)
        self.tree.inc_lock_ref(new_node)
        self.tree.dec_lock_ref(req.last_node)
        req.prefix_indices, req.last_node = new_prefix, new_node


def prepare_extend(mem: KVMemory, reqs: list[Req]) -> ForwardBatch:
    """Rows and slots for each request's `fill_ids[prefix_len:]`; returns the forward batch."""
    pool = mem.req_to_token_pool
    need_rows = [r for r in reqs if r.req_pool_idx is None]
    if need_rows:
        rows = pool.alloc(len(need_rows))
        if rows is None:
            raise RuntimeError("req_to_token pool exhausted (max_running_requests too high)")
        for r, row in zip(need_rows, rows):
            r.req_pool_idx = int(row)
    total = sum(r.extend_len for r in reqs)
    out_cache_loc = mem.alloc_slots(total)
    if out_cache_loc is None:
        raise RuntimeError(f"KV pool cannot hold {total} new tokens")
    r2t = pool.req_to_token
    start = 0
    for r in reqs:
        row, pre, ext = r.req_pool_idx, r.prefix_len, r.extend_len
        if pre:
            r2t[row, :pre] = r.prefix_indices.to(r2t.device)
        r2t[row, pre: pre + ext] = out_cache_loc[start: start + ext].to(r2t.device)
        r.kv_len = pre + ext
        start += ext
    fb = ForwardBatch.create(
        input_ids=[r.fill_ids[r.prefix_len:] for r in reqs],
        prefix_lens=[r.prefix_len for r in reqs],
        req_pool_indices=[r.req_pool_idx for r in reqs],
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
    r2t = mem.req_to_token_pool.req_to_token
    rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=r2t.device)
    cols = torch.tensor([r.kv_len for r in reqs], dtype=torch.int64, device=r2t.device)
    r2t[rows, cols] = out_cache_loc.to(r2t.device)
    batch = ForwardBatch.create(
        input_ids=[[r.output_ids[-1]] for r in reqs],
        prefix_lens=[r.kv_len for r in reqs],
        req_pool_indices=[r.req_pool_idx for r in reqs],
        out_cache_loc=out_cache_loc,
        device=mem.device,
    )
    for r in reqs:
        r.kv_len += 1
        r.fill_ids = r.all_ids
    return batch


def sample_next_ids(logits: torch.Tensor, reqs: list[Req], vocab_size: int,
                    eos_token_ids=()) -> SampleOutput:
    """Next token per request through the batched sampler (penalties, grammar masks, top-k/p,
    min_p, seeds), with raw logprobs when any request asked for them."""
    info = SamplingBatchInfo.from_reqs(
        [(r.sampling_params, r.output_ids, r.origin_input_ids) for r in reqs],
        vocab_size, logits.device, eos_token_ids=list(eos_token_ids),
        grammars=[r.grammar for r in reqs])
    return info.sample(logits[:, :vocab_size], return_logprobs=any(r.return_logprob for r in reqs))
