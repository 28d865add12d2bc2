"""/pause_generation and /continue_generation (SGLang's, used by RL trainers around weight
updates), one pause at a time.

Pausing sends a `GenerationControlReq` and answers once the engine applied it, so no step runs
after the reply: `in_place` keeps running and queued requests with their KV; `retract` moves
running requests back to the queue and frees their KV (so a weight update can run and the prefix
cache can be flushed during the pause); `abort` (the default) ends every request with an abort.
New requests queue in the engine until /continue_generation.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from nlcli.engine.api.http_utils import json_response, native_error, read_json
from nlcli.engine.io_struct import GenerationControlOutput, GenerationControlReq

PAUSED = {"message": "Generation paused successfully.", "status": "ok"}
CONTINUED = {"message": "Generation continued successfully.", "status": "ok"}
_ENGINE_TIMEOUT = 60.0


class PauseGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["abort", "retract", "in_place"] = "abort"
    rid: Optional[str] = None  # every SGLang control request may carry these two; unused here
    http_worker_ipc: Optional[str] = None


class ContinueGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    torch_empty_cache: bool = True
    rid: Optional[str] = None
    http_worker_ipc: Optional[str] = None


class PauseManager:
    def __init__(self, tm):
        self.tm = tm
        self.lock = asyncio.Lock()
        self.reply: Optional[asyncio.Future] = None
        self.paused = False
        self.mode: Optional[str] = None
        tm.on_message(GenerationControlOutput, self._on_reply)

    @property
    def kv_free(self) -> bool:
        """Paused so that no request holds KV: a weight update need not wait for them."""
        return self.paused and self.mode in ("abort", "retract")

    def _on_reply(self, msg: GenerationControlOutput) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(msg)

    async def _control(self, msg: GenerationControlReq) -> GenerationControlOutput:
        async with self.lock:
            self.reply = asyncio.get_running_loop().create_future()
            self.tm.send(msg)
            return await asyncio.wait_for(self.reply, _ENGINE_TIMEOUT)

    async def _body(self, request: Request, model: type[BaseModel]) -> BaseModel:
        body = await read_json(request)
        try:
            return model.model_validate({} if body is None else body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            raise ValueError(f"Invalid request: {where}: {err['msg']}") from None

    async def pause(self, request: Request):
        try:
            req = await self._body(request, PauseGenerationRequest)
        except ValueError as e:
            return native_error(str(e))
        try:
            await self._control(GenerationControlReq(pause=True, mode=req.mode))
        except asyncio.TimeoutError:
            return native_error("The engine did not answer the pause request.", 503)
        self.paused, self.mode = True, req.mode
        return json_response(PAUSED)

    async def resume(self, request: Request):
        try:
            req = await self._body(request, ContinueGenerationRequest)
        except ValueError as e:
            return native_error(str(e))
        try:
            await self._control(GenerationControlReq(pause=False,
                                                     torch_empty_cache=req.torch_empty_cache))
        except asyncio.TimeoutError:
            return native_error("The engine did not answer the continue request.", 503)
        self.paused, self.mode = False, None
        return json_response(CONTINUED)


def register_pause_routes(app, tm) -> PauseManager:
    manager = PauseManager(tm)
    app.add_api_route("/pause_generation", manager.pause, methods=["POST"])
    app.add_api_route("/continue_generation", manager.resume, methods=["POST"])
    return manager
