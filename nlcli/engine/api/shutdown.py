"""The API process's side of a graceful shutdown: drain, then end what is left the normal way.

After the first signal the TokenizerManager is draining (new work and /health get 503). `drain`
waits for the requests in flight up to the shutdown timeout, then has the engine abort the rest,
each reported as finish_reason `{"type": "abort", "message": ..., "status_code": 503}`, so streams
end with that final event and `[DONE]`, and non-streaming routes answer 503 in their own envelope.
Only then may uvicorn exit: nothing is left for it to cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from nlcli.engine.api.req_state import EngineDeadError
from nlcli.engine.io_struct import AbortReq

logger = logging.getLogger("nlcli.shutdown")

SHUTDOWN_MESSAGE = "The server is shutting down."
# Seconds the engine gets to answer the aborts before the requests are ended here.
ABORT_GRACE = 5.0


async def _until_idle(tm, deadline: float, stop: Callable[[], bool]) -> None:
    while tm.in_flight() and time.monotonic() < deadline and not stop():
        await asyncio.sleep(0.05)


def abort_in_flight(tm, message: str = SHUTDOWN_MESSAGE, status_code: int = 503) -> int:
    """Have the engine abort every unfinished request, reported with `message` and `status_code`;
    returns how many."""
    left = tm.in_flight()
    for st in left:
        st.abort_with(message, status_code)
        tm.send(AbortReq(rid=st.rid, message=message))
    return len(left)


async def drain(tm, timeout: float, hurry: Callable[[], bool]) -> int:
    """Wait up to `timeout` s for the requests in flight (less once `hurry()`), then abort the
    rest; returns how many had to be aborted."""
    await _until_idle(tm, time.monotonic() + timeout, hurry)
    left = abort_in_flight(tm)
    if not left:
        return 0
    logger.warning("Shutdown: aborting %d request(s) still in flight", left)
    await _until_idle(tm, time.monotonic() + ABORT_GRACE, lambda: False)
    if tm.in_flight():  # a hung engine: end them here, as a 503 all the same
        logger.warning("The engine did not answer the aborts in %.0f s; ending them here",
                       ABORT_GRACE)
        for st in tm.in_flight():
            st.end_now(EngineDeadError(SHUTDOWN_MESSAGE))
    return left
