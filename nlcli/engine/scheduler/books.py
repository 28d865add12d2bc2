"""SchedulerBooks: the scheduler's accounting, logs and gauges.

The idle books check (free + evictable + protected slots == pool size, every request row free)
catches KV leaks; `NL_TEST_STRICT_LEAK=1` (set by the tests) turns a leak into an exception. The
`Prefill batch.` / `Decode batch.` log lines and the heartbeat's gauges read the same counters.
Mixed into `Scheduler`, whose state (mem, tree, running, waiting, counters) it reads.
"""

from __future__ import annotations

import logging
import time

from nlcli.engine.io_struct import Heartbeat

logger = logging.getLogger("nlcli.scheduler")


class MemoryLeakError(RuntimeError):
    pass


class SchedulerBooks:
    def check_books(self) -> None:
        self.books_checked = True
        alloc = self.mem.allocator
        free, size = int(alloc.available_size()), int(alloc.size)
        evictable, protected = self.tree.evictable_size(), self.tree.protected_size()
        rows_free = int(self.mem.req_to_token_pool.available_size())
        ok = free + evictable + protected == size and protected == 0
        ok = ok and rows_free == self._rows_total()
        if not ok:
            msg = (f"token_to_kv_pool_allocator memory leak detected! total={size}, available={free}, "
                   f"evictable={evictable}, protected={protected}, free rows={rows_free}")
            logger.error(msg)
            if self.strict_leak:
                raise MemoryLeakError(msg)

    def _rows_total(self) -> int:
        pool = self.mem.req_to_token_pool
        return int(getattr(pool, "size", pool.req_to_token.shape[0]))

    # ---- logs and gauges -------------------------------------------------------------------
    def _usage(self) -> float:
        return self.mem.used() / max(self.mem.size, 1)

    def _hit_rate(self) -> float:
        return 100.0 * self.total_cached / self.total_prefill if self.total_prefill else 0.0

    def _log_prefill(self, n: int, new_tokens: int, cached: int) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, cache hit rate: %.2f%%, "
            "token usage: %.2f, #running-req: %d, #queue-req: %d", n, new_tokens, cached,
            self._hit_rate(), self._usage(), len(self.running),
            len(self.waiting) + bool(self.chunked_req))

    def _log_decode(self) -> None:
        now = time.monotonic()
        self.last_throughput = self.gen_tokens_since_log / max(now - self.last_decode_log, 1e-6)
        self.gen_tokens_since_log, self.last_decode_log = 0, now
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
            "gen throughput (token/s): %.2f, #queue-req: %d", len(self.running), self.mem.used(),
            self._usage(), self.last_throughput, len(self.waiting))

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(num_running_reqs=len(self.running),
                         num_queue_reqs=len(self.waiting) + bool(self.chunked_req),
                         num_used_tokens=self.mem.used(), token_usage=self._usage(),
                         cache_hit_rate=self._hit_rate() / 100.0,
                         gen_throughput=self.last_throughput, num_retractions=self.num_retractions,
                         kv_available=int(self.mem.allocator.available_size()),
                         kv_evictable=int(self.tree.evictable_size()), kv_used=self.mem.used())
