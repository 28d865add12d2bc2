"""The choreography of a hot weight update (`/update_weights`, `/update_weights_from_disk`).

API process: one update at a time (a second one is refused at once with SGLang's message); new
requests are held in the API process while it waits for every request already sent to the
engine to finish (or aborts them, with `abort_all_requests`; or, while generation is paused with
no request holding KV, goes ahead at once), then the engine is asked to update; held requests go
out once it answered, in their arrival order, so they run on whichever weights are then served.
On success the server args and model info report the new `model_path` / `load_format`.

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
    def __init__(self, tm, on_success: Callable[[str, str], None],
                 skip_drain: Callable[[], bool] = lambda: False):
        self.tm = tm
        self.on_success = on_success
        self.lock = asyncio.Lock()
        self.result: Optional[asyncio.Future] = None
        # True while generation is paused with no request holding KV (see pause.py): the engine
        # can update at once, so in-flight (paused) requests are not waited for.
        self.skip_drain = skip_drain
        tm.on_message(UpdateWeightReqOutput, self._on_result)

    def _on_result(self, msg: UpdateWeightReqOutput) -> None:
        if self.result is not None and not self.result.done():
            self.result.set_result(msg)

    async def update(self, model_path: str, load_format: Optional[str],
                     abort_all: bool = False) -> tuple[bool, str, int]:
        """(success, message, num_paused_requests); `abort_all` aborts in-flight requests
        instead of waiting for them (SGLang's `abort_all_requests`)."""
        if self.lock.locked():
            return False, BUSY_MESSAGE, 0
        async with self.lock:
            tm = self.tm
            tm.hold_new_requests()
            paused = 0
            try:
                # Only what the engine was sent: held requests wait for the update anyway.
                in_flight = [st for st in tm.in_flight() if st.sent_at is not None]
                if abort_all and in_flight:
                    logger.info("Update weights: aborting %d in-flight request(s)", len(in_flight))
                    tm.abort_all()
                elif self.skip_drain():
                    paused, in_flight = len(in_flight), []
                failed = await self._drain(in_flight)
                if failed:
                    return False, f"Failed to update weights: {failed}", 0
                out = await self._ask(UpdateWeightReq(model_path, load_format))
                if isinstance(out, str):
                    return False, out, 0
                if not out.success and tm.args.dp_size > 1:
                    out.message += await self._roll_back_groups()
            finally:
                tm.release_held()
            if out.success:
                self.on_success(out.model_path, out.load_format)
            return out.success, out.message, paused

    async def _ask(self, msg: UpdateWeightReq) -> UpdateWeightReqOutput | str:
        """Send `msg` to the engine (every group) and await the (merged) answer; a failure
        message when the engine dies or does not answer in time."""
        tm = self.tm
        self.result = asyncio.get_running_loop().create_future()
        tm.send(msg)
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not self.result.done():
            if tm.dead is not None:
                return f"Failed to update weights: {tm.dead}"
            if time.monotonic() > deadline:
                return (f"Failed to update weights: the engine did not answer within "
                        f"{RESULT_TIMEOUT:.0f} s.")
            await asyncio.wait({self.result}, timeout=0.2)
        return self.result.result()

    async def _roll_back_groups(self) -> str:
        """All or nothing across --dp-size groups: a failed group rolled itself back, but the
        others may have loaded the new weights, so every group reloads the served checkpoint."""
        args = self.tm.args
        logger.warning("Update weights failed in a DP group; reloading %s in every group",
                       args.model_path)
        back = await self._ask(UpdateWeightReq(args.model_path, args.load_format))
        if isinstance(back, UpdateWeightReqOutput) and back.success:
            return f" Every DP group is back on {args.model_path}."
        why = back if isinstance(back, str) else back.message
        return f" Rolling the other DP groups back failed too: {why}"

    async def _drain(self, in_flight: list) -> Optional[str]:
        """Wait for `in_flight` (requests the engine was sent) to finish; None when they did,
        else why not."""
        tm = self.tm
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
        asked = "abort_all_requests" in body or "abort_all" in body
        abort_all = body.get("abort_all_requests", body.get("abort_all", False))
        if not isinstance(abort_all, bool):
            return _result(False, "abort_all_requests must be a boolean.", 0, asked)
        success, message, paused = await self.update(body["model_path"], load_format, abort_all)
        return _result(success, message, paused, asked)


def _result(success: bool, message: str, num_paused_requests: int = 0,
            asked: bool = False) -> Response:
    """The brief's exact {"success", "message"}; SGLang's num_paused_requests only when the client
    sent abort_all_requests (it reads the count then) or requests were paused across the update."""
    body: dict = {"success": success, "message": message}
    if asked or num_paused_requests:
        body["num_paused_requests"] = num_paused_requests
    return json_response(body, 200 if success else 400)


def register_weight_update_routes(app, tm, on_success: Callable[[str, str], None],
                                  skip_drain: Callable[[], bool] = lambda: False
                                  ) -> WeightUpdateManager:
    manager = WeightUpdateManager(tm, on_success, skip_drain)
    for path in ("/update_weights_from_disk", "/update_weights"):
        app.add_api_route(path, manager.handle, methods=["POST"])
    return manager
