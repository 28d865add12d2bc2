"""Schedule policy: waiting-queue order (lpm / fcfs) and admission of requests into a prefill batch.

Admission respects three budgets: `max_prefill_tokens` new tokens per batch (decode tokens of a
mixed batch included), `max_running_requests`, and KV memory (free + evictable slots, less what
running requests are expected to still need, estimated as remaining new tokens, clipped to
`clip_max_new_tokens` (SGLang's SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION, 4096), times
`new_token_ratio`). The clip lets requests without max_tokens (whose budget is the whole remaining
context) run together on a small pool; decode retracts when the estimate was too low
(`retract_for_decode`). Prompts longer than `chunked_prefill_size` are split; the chunked request
is the last one admitted.

In-batch prefix sharing (SGLang's in-batch prefix caching, adapted): when waiting requests share a
prefix the radix cache does not hold yet, only the first (the carrier) is admitted; a later one
whose prefix overlaps a request already in this batch (or the chunked request under way) by at
least `IN_BATCH_MIN_SHARED` tokens more than the cache gives it is held for a step. The carrier's
KV enters the radix cache right after its forward (`KVMemory.cache_prefill`), so the held sharers
then match it instead of computing it again. The head of the queue is never held, so the queue
always moves.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

import torch

from nlcli.engine.mem_cache.radix_cache import RadixCache
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.req import Req

# SGLang's default for SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION.
CLIP_MAX_NEW_TOKENS = 4096
# Past this queue length lpm's prefix matching costs more than it saves (upstream uses 128 too).
LPM_QUEUE_LIMIT = 128
# Hold a waiting request for a step when that saves at least this many prefill tokens (upstream's
# in-batch thresholds are 32 too: shorter shared heads, such as a common first word, are not worth
# a step of latency).
IN_BATCH_MIN_SHARED = 32
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class NewTokenRatio:
    """How much of their remaining budget running requests are expected to still generate: it
    starts at 0.7 * conservativeness, decays with each decode step, and jumps after a retraction
    (admission was too optimistic)."""

    def __init__(self, conservativeness: float):
        self.conservativeness = conservativeness
        self.base = 0.7 * conservativeness
        self.value = self.base

    def decay(self) -> None:
        self.value = max(self.value - NEW_TOKEN_RATIO_DECAY,
                         MIN_NEW_TOKEN_RATIO * self.conservativeness)

    def after_retraction(self) -> None:
        self.value = min(1.0, self.base + 0.3)


def order_waiting(queue: list[Req], policy: str, mem: KVMemory) -> list[Req]:
    if policy != "lpm" or len(queue) > LPM_QUEUE_LIMIT or not mem.caching:
        return list(queue)
    scored = []
    for req in queue:
        scored.append((-mem.cached_prefix_len(req.all_ids[:-1]), req.arrival, req))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in scored]


class InBatchPrefixes:
    """The prefixes this step's batch will have computed (a token trie with no KV behind it)."""

    def __init__(self) -> None:
        self.trie = RadixCache(None)

    @staticmethod
    def _key(req: Req) -> list[int]:
        ids = req.all_ids
        return ids[: min(len(ids) - 1, req.max_prefix_match)]

    def add(self, req: Req) -> None:
        key = self._key(req)
        self.trie.insert(key, torch.zeros(len(key), dtype=torch.int64))

    def gain(self, req: Req) -> int:
        """How many more prefix tokens `req` would find cached after this step than now."""
        return self.trie.match_prefix(self._key(req))[0].shape[0] - req.prefix_len


class PrefillAdder:
    def __init__(self, mem: KVMemory, running: list[Req], *, max_prefill_tokens: int,
                 chunked_prefill_size: int, max_running_requests: int, new_token_ratio: float,
                 context_len: int, clip_max_new_tokens: int = CLIP_MAX_NEW_TOKENS,
                 mixed_decodes: int = 0):
        self.mem = mem
        self.context_len = context_len
        self.clip = clip_max_new_tokens
        # Decode tokens riding in the same forward (a mixed batch) use the budget and one slot each.
        self.rem_prefill = max_prefill_tokens - mixed_decodes
        self.chunk_size = chunked_prefill_size if chunked_prefill_size > 0 else None
        self.rem_slots_for_reqs = max_running_requests - len(running)
        self.ratio = new_token_ratio
        self.reserved = sum(self._future(r) for r in running)
        self.idle = not running
        self.consumed = mixed_decodes
        self.admitted: list[Req] = []
        self.chunked: Optional[Req] = None
        self.held: list[Req] = []  # sharers of a prefix this batch computes: next step
        self.in_batch = InBatchPrefixes() if mem.caching else None

    def _future(self, req: Req) -> int:
        return int(min(req.remaining_new_tokens(self.context_len), self.clip) * self.ratio)

    def _room(self) -> int:
        return self.mem.available() - self.reserved - self.consumed

    def add_chunked(self, req: Req) -> bool:
        """Continue a request already part-way through chunked prefill (its row is kept)."""
        return self._add(req, continuing=True)

    def add(self, req: Req) -> bool:
        """Try to admit `req`; False means stop looking at the queue this step."""
        if self.rem_slots_for_reqs <= 0 or self.chunked is not None:
            return False
        if len(self.held) >= LPM_QUEUE_LIMIT:
            return False  # enough scanning for one step
        return self._add(req, continuing=False)

    def _add(self, req: Req, continuing: bool) -> bool:
        ids = req.all_ids
        if not continuing:
            self.mem.lock_prefix(req, ids)
            if self.in_batch is not None and self.in_batch.gain(req) >= IN_BATCH_MIN_SHARED:
                self.mem.unlock_prefix(req)
                self.held.append(req)
                return True
        extend = len(ids) - req.prefix_len
        take = extend
        if self.chunk_size is not None:
            take = min(take, self.chunk_size)
        if take > self.rem_prefill:
            # The first request may exceed the prefill budget when it cannot be split.
            if self.admitted and self.chunk_size is not None:
                take = self.rem_prefill
            elif self.admitted:
                take = 0
        chunking = take < extend
        need = take + (0 if chunking else self._future(req))
        if self.idle and not self.admitted:
            # Alone on the engine: only the prompt must fit; decode retracts or stops at the pool.
            need = take
        if take <= 0 or need > self._room():
            # Not now; a first, lone request waits for running ones to free memory.
            if not continuing:
                self.mem.unlock_prefix(req)
            return False
        req.fill_ids = ids[: req.prefix_len + take]
        if req.cached_tokens is None:
            req.cached_tokens = req.prefix_len
        self.consumed += need
        self.rem_prefill -= take
        self.admitted.append(req)
        if self.in_batch is not None:
            self.in_batch.add(req)
        if not continuing:
            self.rem_slots_for_reqs -= 1
        if chunking:
            self.chunked = req
        return not chunking


def admit_prefill(adder: PrefillAdder, chunked: Optional[Req], waiting: list[Req],
                  policy: str) -> tuple[list[Req], Optional[Req]]:
    """The requests of the next prefill batch (none: decode instead) and the chunked request
    after it: the one under way (`chunked`) goes first and keeps its place when it does not fit
    (running requests decode and free memory), else the queue in `policy` order."""
    if chunked is not None:
        adder.add_chunked(chunked)
        if chunked not in adder.admitted:
            return [], chunked
    if adder.chunked is None:
        for req in order_waiting(waiting, policy, adder.mem):
            if not adder.add(req):
                break
    return adder.admitted, (adder.chunked if adder.admitted else chunked)


def retract_for_decode(running: list[Req], waiting: deque[Req], mem: KVMemory,
                       forced: bool) -> tuple[int, Optional[Req]]:
    """Before a decode step: move the newest running requests back to the front of `waiting`
    until every one left gets a slot; `forced` (tests) retracts the newer half first. Returns how
    many were retracted, and the lone request that cannot grow even alone (the caller aborts it)."""
    count = 0
    if forced:
        count = retract(sorted(running, key=lambda r: r.arrival)[len(running) // 2:], running,
                        waiting, mem)
    while len(running) > 1 and mem.available() < len(running):
        count += retract([max(running, key=lambda r: r.arrival)], running, waiting, mem)
    stuck = running[0] if running and mem.available() < len(running) else None
    return count, stuck


def retract(victims: list[Req], running: list[Req], waiting: deque[Req], mem: KVMemory) -> int:
    """Move `victims` from `running` to the front of `waiting`, oldest first in line: their KV is
    released (what they computed stays cached), their output kept for the re-prefill, and their
    queue clock restarts (--waiting-timeout). Returns how many moved."""
    now = time.monotonic()
    for r in sorted(victims, key=lambda r: r.arrival, reverse=True):
        running.remove(r)
        mem.release(r)
        r.num_retractions += 1
        r.queued_at = now
        waiting.appendleft(r)
    return len(victims)
