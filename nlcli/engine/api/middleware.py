"""The pure-ASGI middleware in front of the app: API keys (user and admin), request-body size
cap, and the one place an unexpected exception in a route becomes an answer in that API's JSON
envelope.

Plain ASGI on purpose, never Starlette's BaseHTTPMiddleware: that one hides `http.disconnect` from
the routes, and abort-on-disconnect relies on seeing it.
"""

from __future__ import annotations

import logging
import secrets

import orjson
from starlette.requests import ClientDisconnect

from nlcli.engine.api.errors import error_for
from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.protocol import error_body

logger = logging.getLogger("nlcli.http")


# Routes that change the server for everyone: with --admin-api-key only that key opens them.
# Matched as path prefixes, so every /update_weights* variant (and any trailing-slash or suffix
# trick) counts as admin; failing closed is the safe direction here.
ADMIN_ROUTES = ("/update_weights", "/flush_cache", "/abort_request", "/pause_generation",
                "/continue_generation")


def is_admin_route(path: str) -> bool:
    return path.startswith(ADMIN_ROUTES)


class ApiKeyMiddleware:
    """401 `{"error":"Unauthorized"}` unless the request carries a key that opens its route.

    Without an admin key, `api_key` opens everything (but /health). With one, the admin routes take
    only the admin key, and the others take either key (none at all when `api_key` is None)."""

    def __init__(self, app, api_key: str | None, admin_key: str | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.admin = admin_key.encode() if admin_key else None

    def _allowed(self, path: str, token: bytes) -> bool:
        # Both comparisons always run, so timing does not tell which key was close.
        user = self.key is not None and secrets.compare_digest(token, self.key)
        admin = self.admin is not None and secrets.compare_digest(token, self.admin)
        if self.admin is not None and is_admin_route(path):
            return admin
        return user or admin or self.key is None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if not self._allowed(scope["path"], token):
            body = b'{"error":"Unauthorized"}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 above `limit` bytes, counted as they arrive (chunked bodies have no Content-Length).

    The 413 goes out the moment the count passes the cap, before the app could answer; the app
    then reads a disconnect, and whatever it still sends or raises is dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen, started, rejected = 0, False, False

        async def counted():
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded(msg):
            nonlocal started
            if rejected:
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send):
        body = orjson.dumps({"error": {"message": f"Request body is larger than {self.limit} bytes."}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ErrorEnvelopeMiddleware:
    """An exception a route lets escape, before it started answering, becomes a JSON error: the
    native `{"error": {"message"}}` or, under /v1, OpenAI's envelope (/v1/responses: its nested
    one, as errors.error_for answers there). 400 when the request
    itself caused it (nested too deeply to handle), else 500 with the traceback logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            raise  # nobody to answer (or the body cap answered already)
        except Exception as e:
            if started:
                raise
            client = isinstance(e, RecursionError)
            status = 400 if client else 500
            if client:
                message = "The request is nested too deeply to be handled."
            else:
                logger.exception("Unexpected error in %s %s", scope["method"], scope["path"])
                message = f"Internal server error ({type(e).__name__}): {e}"
            path = scope["path"]
            if path.startswith("/v1/") and not path.startswith("/v1/responses"):
                kind = "BadRequestError" if client else "InternalServerError"
                resp = json_response(error_body(message, status, kind), status)
            else:
                resp = error_for(path, status, message)
            await resp(scope, receive, send)
