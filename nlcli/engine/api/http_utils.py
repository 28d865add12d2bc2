"""HTTP plumbing shared by the native, embedding and OpenAI routes: JSON bodies in and out, and
waiting for a request's final outputs while watching for the client to go away.

Disconnects are read from the ASGI receive channel (pure ASGI: no BaseHTTPMiddleware anywhere), so a
client that drops a non-streaming request has it aborted in the engine within one step.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

import orjson
from fastapi import Request, Response

from nlcli.engine.limits import check_json_depth

logger = logging.getLogger("nlcli.http")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), status_code=status,
                    media_type="application/json")


def native_error(message: str, status: int = 400) -> Response:
    """The native API's error body: `{"error": {"message": ...}}`."""
    return json_response({"error": {"message": message}}, status)


def loads_body(raw: bytes) -> Any:
    """Parse a JSON request body; malformed or too deeply nested JSON is the client's error (a
    400, never a 422)."""
    try:
        body = orjson.loads(raw or b"null")
    except orjson.JSONDecodeError as e:
        raise ValueError(f"Malformed JSON body: {e}") from None
    check_json_depth(body)
    return body


async def read_json(request: Request) -> Any:
    return loads_body(await request.body())


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def last_output(tm, st) -> dict:
    """A request's final output (the TokenizerManager yields cumulative ones until it finishes)."""
    out = None
    async for out in tm.outputs(st):
        pass
    return out


async def finals_or_disconnect(tm, states, request: Request,
                               final: Callable[[Any], Awaitable[dict]]) -> Optional[list[dict]]:
    """Each request's final output (`final(state)`), in order; None when the client went away
    first, in which case every request is aborted in the engine."""
    work = asyncio.ensure_future(asyncio.gather(*(final(st) for st in states)))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        tm.abort([st.rid for st in states], "Client disconnected")
        logger.info("Client disconnected; aborted %d request(s)", len(states))
        return None
    return work.result()


def engine_rejection(outs: list[dict]) -> Optional[tuple[str, int]]:
    """(message, status) when the engine ended one of the requests with an error status (a 4xx
    for the client's fault, e.g. a grammar that failed to compile; a 500 when a step failed),
    else None. Plain aborts (client gone, /abort_request) carry no status and stay 200s."""
    for out in outs:
        reason = out.get("meta_info", {}).get("finish_reason") or {}
        status = reason.get("status_code")
        if reason.get("type") == "abort" and status is not None and status >= 400:
            return reason.get("message") or "The request was rejected.", status
    return None
