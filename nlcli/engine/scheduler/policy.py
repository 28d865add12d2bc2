"""Schedule policy: waiting-queue order (lpm / fcfs) and admission of requests into a prefill batch.

Admission respects three budgets: `max_prefill_tokens` new tokens per batch, `max_running_requests`,
and KV memory (free + evictable slots, less what running requests are expected to still need,
estimated as remaining new tokens, clipped to `clip_max_new_tokens` (SGLang's
SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION, 4096), times `new_token_ratio`). The clip lets requests
without max_tokens (whose budget is the whole remaining context) run together on a small pool;
decode retracts when the estimate was too low. Prompts longer than `chunked_prefill_size` are
split; the chunked request is the last one admitted.
"""

from __future__ import annotations

from typing import Optional

from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.req import Req

# SGLang's default for SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION.
CLIP_MAX_NEW_TOKENS = 4096
# Past this queue length lpm's prefix matching costs more than it saves (upstream uses 128 too).
LPM_QUEUE_LIMIT = 128
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


class PrefillAdder:
    def __init__(self, mem: KVMemory, running: list[Req], *, max_prefill_tokens: int,
                 chunked_prefill_size: int, max_running_requests: int, new_token_ratio: float,
                 context_len: int, clip_max_new_tokens: int = CLIP_MAX_NEW_TOKENS):
        self.mem = mem
        self.context_len = context_len
        self.clip = clip_max_new_tokens
        self.rem_prefill = max_prefill_tokens
        self.chunk_size = chunked_prefill_size if chunked_prefill_size > 0 else None
        self.rem_slots_for_reqs = max_running_requests - len(running)
        self.ratio = new_token_ratio
        self.reserved = sum(self._future(r) for r in running)
        self.idle = not running
        self.consumed = 0
        self.admitted: list[Req] = []
        self.chunked: Optional[Req] = None

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
        return self._add(req, continuing=False)

    def _add(self, req: Req, continuing: bool) -> bool:
        ids = req.all_ids
        if not continuing:
            self.mem.lock_prefix(req, ids)
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
