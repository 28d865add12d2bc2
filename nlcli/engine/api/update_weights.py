"""The choreography of a hot weight update (`/update_weights`, `/update_weights_from_disk`).

API process: one update at a time (a second one is refused at once with SGLang's message); new
requests are held in the API process while it waits for every request already sent to the
engine to finish, then the engine is asked to update; held requests go out once it answered, in
their arrival order, so they run on whichever weights are then served. On success the server
args and model info report the new `model_path` / `load_format`.

Every wait is bounded: the drain counts only requests actually sent, gives up when the engine is
wedged (it no longer has them) or after DRAIN_TIMEOUT, and the engine's answer is awaited for at
most RESULT_TIMEOUT; either way the update fails with a message and held requests are released.

The engine's half is `nlcli.engine.scheduler.weight_update`. Importing this module imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from fastapi import Request
from fastapi.responses import Response

from nlcli.engine.api.http_utils import json_response, read_json
from nlcli.engine.io_struct import UpdateWeightReq, UpdateWeightReqOutput

logger = logging.getLogger("nlcli.weight_update")

BUSY_MESSAGE = "Another update is in progress. Please try again later."
_POLL = 0.01
# Seconds the drain waits for requests already running before the update is refused.
DRAIN_TIMEOUT = 300.0
# Seconds to wait for the engine's answer (loading a large checkpoint from disk).
RESULT_TIMEOUT = 1800.0


class WeightUpdateManager:
    def __init__(self, tm, on_success: Callable[[str, str], None]):
        self.tm = tm
        self.on_success = on_success
        self.lock = asyncio.Lock()
        self.result: Optional[asyncio.Future] = None
        tm.on_message(UpdateWeightReqOutput, self._on_result)

    def _on_result(self, msg: UpdateWeightReqOutput) -> None:
        if self.result is not None and not self.result.done():
            self.result.set_result(msg)

    async def update(self, model_path: str, load_format: Optional[str]) -> tuple[bool, str]:
        if self.lock.locked():
            return False, BUSY_MESSAGE
        async with self.lock:
            tm = self.tm
            tm.hold_new_requests()
            try:
                failed = await self._drain()
                if failed:
                    return False, f"Failed to update weights: {failed}"
                self.result = asyncio.get_running_loop().create_future()
                tm.send(UpdateWeightReq(model_path, load_format))
                deadline = time.monotonic() + RESULT_TIMEOUT
                while not self.result.done():
                    if tm.dead is not None:
                        return False, f"Failed to update weights: {tm.dead}"
                    if time.monotonic() > deadline:
                        return False, (f"Failed to update weights: the engine did not answer within "
                                       f"{RESULT_TIMEOUT:.0f} s.")
                    await asyncio.wait({self.result}, timeout=0.2)
                out: UpdateWeightReqOutput = self.result.result()
            finally:
                tm.release_held()
            if out.success:
                self.on_success(out.model_path, out.load_format)
            return out.success, out.message

    async def _drain(self) -> Optional[str]:
        """Wait for the requests the engine was sent; None when they finished, else why not."""
        tm = self.tm
        in_flight = [st for st in tm.in_flight() if st.sent_at is not None]
        if in_flight:
            logger.info("Update weights: waiting for %d in-flight request(s)", len(in_flight))
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            left = sum(not st.finished for st in in_flight)
            if not left:
                return None
            if tm.dead is not None:
                return tm.dead
            if tm.wedged():
                return f"the engine stopped making progress on {left} request(s)."
            if time.monotonic() > deadline:
                return (f"{left} request(s) still running after {DRAIN_TIMEOUT:.0f} s. Please try "
                        "again later.")
            await asyncio.sleep(_POLL)

    async def handle(self, request: Request) -> Response:
        try:
            body = await read_json(request)
        except ValueError as e:
            return _result(False, str(e))
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            return _result(False, "model_path must be a string.")
        load_format = body.get("load_format")
        if load_format is not None and not isinstance(load_format, str):
            return _result(False, "load_format must be a string or null.")
        success, message = await self.update(body["model_path"], load_format)
        return _result(success, message)


def _result(success: bool, message: str) -> Response:
    return json_response({"success": success, "message": message}, 200 if success else 400)


def register_weight_update_routes(app, tm, on_success: Callable[[str, str], None]) -> WeightUpdateManager:
    manager = WeightUpdateManager(tm, on_success)
    for path in ("/update_weights_from_disk", "/update_weights"):
        app.add_api_route(path, manager.handle, methods=["POST"])
    return manager
