"""The pure-ASGI middleware in front of the app: API keys (user and admin) and request-body size cap.

Plain ASGI on purpose, never Starlette's BaseHTTPMiddleware: that one hides `http.disconnect` from
the routes, and abort-on-disconnect relies on seeing it.
"""

from __future__ import annotations

import secrets

import orjson


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
    """413 above `limit` bytes, counted as they arrive (chunked bodies have no Content-Length)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        body = orjson.dumps({"error": {"message": f"Request body is larger than {self.limit} bytes."}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
