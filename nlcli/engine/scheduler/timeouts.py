"""Request deadlines, the queue cap and the admission clip, as SGLang has them (environ.py,
managers/scheduler.py, schedule_policy.py).

A request may wait in the queue at most `--waiting-timeout` seconds (`SGLANG_REQ_WAITING_TIMEOUT`)
and run at most `--running-timeout` seconds from the start of its first prefill
(`SGLANG_REQ_RUNNING_TIMEOUT`); past either it ends with an abort carrying status 503 and
SGLang's message, and the scheduler frees its KV. `--max-queued-requests` refuses a request that
would make the queue longer than the cap, with 503 "The request queue is full.". Admission
counts at most `clip_max_new_tokens` future tokens per request (policy.py;
`--clip-max-new-tokens-estimation`, `SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION`, 4096).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

from nlcli.engine.scheduler.policy import CLIP_MAX_NEW_TOKENS
from nlcli.engine.scheduler.req import Req

WAITING_TIMEOUT_MESSAGE = "Request waiting timeout reached."
RUNNING_TIMEOUT_MESSAGE = "Request running timeout reached."
QUEUE_FULL_MESSAGE = "The request queue is full."
TIMEOUT_STATUS = 503


class RequestLimits:
    def __init__(self, server_args):
        wait = server_args.env_default("waiting_timeout", "SGLANG_REQ_WAITING_TIMEOUT", -1.0)
        run = server_args.env_default("running_timeout", "SGLANG_REQ_RUNNING_TIMEOUT", -1.0)
        self.waiting_timeout: Optional[float] = wait if wait > 0 else None
        self.running_timeout: Optional[float] = run if run > 0 else None
        self.max_queued: Optional[int] = server_args.max_queued_requests
        self.clip_max_new_tokens = int(server_args.env_default(
            "clip_max_new_tokens_estimation", "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION",
            CLIP_MAX_NEW_TOKENS))

    @property
    def any_timeout(self) -> bool:
        return self.waiting_timeout is not None or self.running_timeout is not None

    def queue_full(self, queued: int) -> bool:
        return self.max_queued is not None and queued >= self.max_queued

    def expired_waiting(self, reqs: Iterable[Req], now: float) -> list[Req]:
        if self.waiting_timeout is None:
            return []
        return [r for r in reqs if now - r.queued_at > self.waiting_timeout]

    def expired_running(self, reqs: Iterable[Req], now: float) -> list[Req]:
        if self.running_timeout is None:
            return []
        return [r for r in reqs
                if r.started_at is not None and now - r.started_at > self.running_timeout]

    def expire(self, waiting: deque, running: list[Req], chunked: Optional[Req]
               ) -> tuple[list[Req], Optional[Req]]:
        """Abort (503) the requests past a deadline and take the late ones out of `waiting`;
        returns them (the caller drops finished ones from its running list and frees their KV)
        and the chunked request still under way."""
        now = time.monotonic()
        late = self.expired_waiting(waiting, now)
        for r in late:
            waiting.remove(r)
            r.finish_abort(WAITING_TIMEOUT_MESSAGE, TIMEOUT_STATUS)
        overdue = self.expired_running(running + ([chunked] if chunked else []), now)
        for r in overdue:
            r.finish_abort(RUNNING_TIMEOUT_MESSAGE, TIMEOUT_STATUS)
        return late + overdue, None if chunked in overdue else chunked
