"""SchedulerBooks: the scheduler's counters, its idle leak check, log lines and heartbeat gauges.

The idle books check (free + evictable + protected slots == pool size, every request row free)
catches KV leaks; `strict` (`NL_TEST_STRICT_LEAK=1`, set by the tests) turns a leak into an
exception. The `Prefill batch.` / `Decode batch.` log lines and the heartbeat read the same
counters. Queue lengths come in as arguments: the books never look inside the scheduler.
"""

from __future__ import annotations

import logging
import time

from nlcli.engine.io_struct import Heartbeat
from nlcli.engine.scheduler.cache import KVMemory

logger = logging.getLogger("nlcli.scheduler")


class MemoryLeakError(RuntimeError):
    pass


class SchedulerBooks:
    def __init__(self, mem: KVMemory, strict: bool = False):
        self.mem = mem
        self.strict = strict
        self.total_cached = 0  # prompt tokens served from the radix cache
        self.total_prefill = 0  # prompt tokens prefilled or served from the cache
        self.num_retractions = 0
        self.decode_steps = 0
        self.gen_tokens_since_log = 0
        self.last_decode_log = time.monotonic()
        self.last_throughput = 0.0
        self.checked = True  # False once a request arrived; the idle check sets it again

    # ---- counters ------------------------------------------------------------------------
    def count_prefill(self, new_tokens: int, cached: int) -> None:
        self.total_cached += cached
        self.total_prefill += new_tokens + cached

    def count_generated(self, n: int) -> None:
        self.gen_tokens_since_log += n

    def count_retractions(self, n: int) -> None:
        self.num_retractions += n

    def reset_hits(self) -> None:
        """The cache was emptied: the hit rate starts afresh and the books want a check."""
        self.total_cached = self.total_prefill = 0
        self.checked = False

    # ---- the leak check ------------------------------------------------------------------
    def check(self) -> None:
        self.checked = True
        c = self.mem.counts()
        ok = c.free + c.evictable + c.protected == c.size and c.protected == 0
        ok = ok and c.rows_free == c.rows_total
        if not ok:
            msg = (f"token_to_kv_pool_allocator memory leak detected! total={c.size}, "
                   f"available={c.free}, evictable={c.evictable}, protected={c.protected}, "
                   f"free rows={c.rows_free}")
            logger.error(msg)
            if self.strict:
                raise MemoryLeakError(msg)

    # ---- logs and gauges -----------------------------------------------------------------
    def _usage(self) -> float:
        return self.mem.used() / max(self.mem.size, 1)

    def _hit_rate(self) -> float:
        return 100.0 * self.total_cached / self.total_prefill if self.total_prefill else 0.0

    def log_prefill(self, n: int, new_tokens: int, cached: int, running: int, queued: int) -> None:
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, cache hit rate: %.2f%%, "
            "token usage: %.2f, #running-req: %d, #queue-req: %d", n, new_tokens, cached,
            self._hit_rate(), self._usage(), running, queued)

    def log_decode(self, running: int, queued: int) -> None:
        now = time.monotonic()
        self.last_throughput = self.gen_tokens_since_log / max(now - self.last_decode_log, 1e-6)
        self.gen_tokens_since_log, self.last_decode_log = 0, now
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
            "gen throughput (token/s): %.2f, #queue-req: %d", running, self.mem.used(),
            self._usage(), self.last_throughput, queued)

    def heartbeat(self, running: int, queued: int, grammar_queued: int = 0) -> Heartbeat:
        return Heartbeat(num_running_reqs=running, num_queue_reqs=queued,
                         num_grammar_queue_reqs=grammar_queued,
                         num_used_tokens=self.mem.used(), token_usage=self._usage(),
                         cache_hit_rate=self._hit_rate() / 100.0,
                         gen_throughput=self.last_throughput, num_retractions=self.num_retractions,
                         kv_available=self.mem.free_slots(), kv_evictable=self.mem.evictable(),
                         kv_used=self.mem.used())
