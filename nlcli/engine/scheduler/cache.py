"""KVMemory: the scheduler's view of the runner's pools plus the radix cache that sits on them.

Owns the per-request memory plan: matching and locking a request's cached prefix, allocating KV
slots (evicting unlocked radix leaves when the allocator runs short), inserting what a request
computed into the radix cache as soon as its prefill (or prefill chunk) is written, so requests
that arrive together reuse it, and, when a request finishes or is retracted, inserting the rest
and freeing what the tree does not keep.
Books invariant (checked when idle): free + evictable + protected slots == pool size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nlcli.engine.mem_cache.radix_cache import RadixCache
from nlcli.engine.scheduler.req import Req


@dataclass(frozen=True)
class KVCounts:
    """One snapshot of the slot and row books."""

    size: int
    free: int
    evictable: int
    protected: int
    rows_free: int
    rows_total: int


class KVMemory:
    def __init__(self, runner, disable_cache: bool):
        self.req_to_token_pool = runner.req_to_token_pool
        self.allocator = runner.token_to_kv_pool_allocator
        self.tree = RadixCache(self.allocator, disable=disable_cache)
        self.device = runner.device

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.allocator.size)

    @property
    def caching(self) -> bool:
        """Whether finished requests leave their prefixes in a radix cache."""
        return not self.tree.disable

    def available(self) -> int:
        return int(self.allocator.available_size()) + self.tree.evictable_size()

    def used(self) -> int:
        """Slots not free and not merely cached: held by running requests or locked by them."""
        return self.size - int(self.allocator.available_size()) - self.tree.evictable_size()

    def free_slots(self) -> int:
        return int(self.allocator.available_size())

    def evictable(self) -> int:
        return self.tree.evictable_size()

    def counts(self) -> KVCounts:
        pool = self.req_to_token_pool
        return KVCounts(size=self.size, free=self.free_slots(), evictable=self.evictable(),
                        protected=self.tree.protected_size(),
                        rows_free=int(pool.available_size()), rows_total=int(pool.size))

    def cached_prefix_len(self, ids: Sequence[int]) -> int:
        """How many leading ids the radix cache holds (touches their LRU stamps)."""
        return int(self.tree.match_prefix(ids)[0].shape[0])

    # ---- whole pool ----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every slot, row and cached prefix at once. Only safe when no request holds any
        (after a failed step has failed every request in flight)."""
        self.tree.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()

    def flush(self) -> None:
        """Hand every cached prefix back to the allocator (no request may hold one)."""
        self.tree.evict_all()
        self.tree.reset()

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        short = n - int(self.allocator.available_size())
        if short > 0:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    def alloc_rows(self, n: int) -> Optional[list[int]]:
        return self.req_to_token_pool.alloc(n)

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token

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
        kv = self.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        own_from = req.prefix_len
        if self.tree.disable:
            self.allocator.free(kv)  # nothing is shared without a tree
        else:
            shared = self.tree.insert(req.all_ids[: req.kv_len], kv)
            # Slots past our locked prefix that the tree already had: our copies are duplicates.
            if shared > own_from:
                self.allocator.free(kv[own_from:shared])
        self.unlock_prefix(req)
        self.req_to_token_pool.free([row])
        req.req_pool_idx = None
        req.kv_len = 0
        req.fill_ids = []

    def discard(self, req: Req) -> None:
        """Give back everything `req` holds without caching what it computed (a request that
        failed on its own: its K/V may be garbage). Its locked prefix stays in the tree."""
        if req.req_pool_idx is not None:
            # Without a tree, a chunked request's "prefix" is its own earlier chunks.
            own_from = 0 if self.tree.disable else req.prefix_len
            row = req.req_pool_idx
            self.allocator.free(self.req_to_token[row, own_from: req.kv_len].to("cpu", torch.int64))
            self.req_to_token_pool.free([row])
        self.unlock_prefix(req)
        req.req_pool_idx, req.kv_len, req.fill_ids = None, 0, []

    def cache_prefill(self, req: Req) -> None:
        """After a prefill forward (a chunk or the whole prompt): put what `req` has written into
        the tree at once, so requests admitted from the next step on reuse it, and lock it as the
        request's prefix (the old lock is released after the new one is taken, so the shared path
        never becomes evictable in between). Where the tree already held some of these tokens
        (another request computed them meanwhile), our copies are freed and the row points at
        the tree's slots instead."""
        row = req.req_pool_idx
        req.kv_len = len(req.fill_ids)
        kv = self.req_to_token[row, : req.kv_len].to("cpu", torch.int64)
        if self.tree.disable:
            req.prefix_indices = kv
            return
        old_len = req.prefix_len
        shared = self.tree.insert(req.fill_ids, kv)
        new_prefix, new_node = self.tree.match_prefix(req.fill_ids)
        if shared > old_len:
            self.allocator.free(kv[old_len:shared])
            self.req_to_token[row, old_len:shared] = new_prefix[old_len:shared].to(
                self.req_to_token.device)
        self.tree.inc_lock_ref(new_node)
        self.tree.dec_lock_ref(req.last_node)
        req.prefix_indices, req.last_node = new_prefix, new_node
