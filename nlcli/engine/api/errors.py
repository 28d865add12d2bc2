"""What FastAPI would answer itself (an unknown route, a wrong method, a path parameter that does
not validate), in nl's envelopes instead of FastAPI's `{"detail": ...}`: the native
`{"error": {"message"}}`, the flat OpenAI error object under /v1, and the nested one under
/v1/responses (as SGLang answers there).
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nlcli.engine.api.http_utils import json_response, native_error
from nlcli.engine.api.openai.protocol import error_body


def _message(status: int, path: str, method: str) -> str:
    if status == 404:
        return f"No route {path!r} on this server."
    if status == 405:
        return f"Method {method} is not allowed on {path!r}."
    return HTTPStatus(status).phrase


def error_for(path: str, status: int, message: str, headers=None):
    """`message` with `status` in the envelope that `path`'s clients read."""
    if path.startswith("/v1/responses"):
        body = {"error": {"message": message, "type": HTTPStatus(status).phrase, "param": None,
                          "code": status}}
        resp = json_response(body, status)
    elif path.startswith("/v1/"):
        resp = json_response(error_body(message, status, HTTPStatus(status).phrase), status)
    else:
        resp = native_error(message, status)
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def install_error_handlers(app) -> None:
    async def http_error(request, exc: StarletteHTTPException):
        path, method = request.url.path, request.method
        message = exc.detail if isinstance(exc.detail, str) and exc.status_code not in (404, 405) \
            else _message(exc.status_code, path, method)
        return error_for(path, exc.status_code, message, getattr(exc, "headers", None))

    async def invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        where = ".".join(str(x) for x in errs[0]["loc"]) if errs else "request"
        text = f"Invalid request: {where}: {errs[0]['msg']}" if errs else "Invalid request."
        return error_for(request.url.path, 400, text)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
