"""/flush_cache's API-side half: one flush at a time, sent to every engine group; it succeeds
only when every group flushed (an engine with requests running or queued refuses)."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from nlcli.engine.api.req_state import EngineDeadError
from nlcli.engine.io_struct import FlushCacheReq, FlushCacheReqOutput

# Seconds to wait for the engines' answer.
FLUSH_TIMEOUT = 60.0


class FlushManager:
    def __init__(self, tm):
        self.tm = tm
        self.lock = asyncio.Lock()
        self.result: Optional[asyncio.Future] = None
        tm.on_message(FlushCacheReqOutput, self._on_result)  # merged over the groups

    def _on_result(self, msg: FlushCacheReqOutput) -> None:
        if self.result is not None and not self.result.done():
            self.result.set_result(msg.success)

    async def flush(self) -> bool:
        """Whether every group flushed; EngineDeadError, or asyncio.TimeoutError after
        FLUSH_TIMEOUT."""
        async with self.lock:
            self.result = asyncio.get_running_loop().create_future()
            self.tm.send(FlushCacheReq())
            deadline = time.monotonic() + FLUSH_TIMEOUT
            while not self.result.done():
                if self.tm.dead is not None:
                    raise EngineDeadError(self.tm.dead)
                if time.monotonic() > deadline:
                    raise asyncio.TimeoutError
                await asyncio.wait({self.result}, timeout=0.2)
            return self.result.result()
