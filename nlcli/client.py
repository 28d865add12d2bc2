"""Synchronous httpx client for a running nl (or SGLang) server: native and OpenAI routes.

Every failure becomes one of the typed errors below, each carrying the CLI exit code it maps to, so
commands never inspect httpx exceptions themselves. The API key only ever travels in the
Authorization header; no message built here contains it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Optional

import httpx

DEFAULT_URL = "http://127.0.0.1:30000"
DEFAULT_TIMEOUT = 300.0
# A dead or firewalled host should fail fast even when reads may legitimately take minutes.
CONNECT_TIMEOUT = 5.0


class NlError(Exception):
    """A request that did not give the caller what it asked for."""

    exit_code = 1

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.status = status


class ServerError(NlError):
    """The server answered, with an error (4xx/5xx, or an error event inside a stream)."""

    exit_code = 1


class Unreachable(NlError):
    """No answer: connection refused, DNS failure, or a timeout."""

    exit_code = 3


class Unhealthy(NlError):
    """The server answered a health probe with a failure."""

    exit_code = 4


class Unauthorized(NlError):
    """401: missing or wrong API key."""

    exit_code = 5


def error_message(resp: httpx.Response) -> str:
    """The human message inside any of the server's error envelopes (native, OpenAI, FastAPI)."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return text or f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, list):  # FastAPI validation errors
            return "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" for d in detail
            )
        if detail is not None:
            return str(detail)
    return json.dumps(body)


def non_json(path: str, resp: httpx.Response) -> str:
    return f"{path} answered non-JSON: {resp.text[:200]!r}"


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """Yield the data payload of each server-sent event; multi-line data joins with newlines."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # SSE comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class NlClient:
    """One connection pool to one server. Use as a context manager."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "NlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code == 401:
            raise Unauthorized(
                f"{error_message(resp)}: wrong or missing API key (--api-key or NL_API_KEY)", 401
            )
        if resp.status_code >= 400:
            raise ServerError(error_message(resp), resp.status_code)
        return resp

    def request(
        self, method: str, path: str, body: Any = None, check: bool = True
    ) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise Unreachable(f"timed out talking to {self.url}{path} ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise Unreachable(f"cannot reach {self.url}: {e}") from e
        return self._check(resp) if check else resp

    def json(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.request(method, path, body)
        try:
            return resp.json()
        except ValueError as e:
            raise ServerError(non_json(path, resp), resp.status_code) from e

    def first_json(self, method: str, paths: list[str], body: Any = None) -> Any:
        """Try route names newest-first, so both old and new SGLang-style servers answer."""
        for path in paths[:-1]:
            resp = self.request(method, path, body, check=False)
            if resp.status_code not in (404, 405):
                self._check(resp)
                return resp.json()
        return self.json(method, paths[-1], body)

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """POST with stream=true and yield each SSE event's JSON; an error event raises."""
        # Streams read with the same per-read timeout: it bounds the gap between events, not the
        # whole generation, so long outputs are fine.
        try:
            with self._http.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                for data in iter_sse(resp.iter_lines()):
                    if data.strip() == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise ServerError(f"malformed stream event: {data[:200]!r}", 200) from None
                    if isinstance(event, dict) and "error" in event and len(event) == 1:
                        err = event["error"]
                        msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                        raise ServerError(msg, resp.status_code)
                    yield event
        except httpx.TimeoutException as e:
            raise Unreachable(f"timed out waiting for {self.url}{path} ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise Unreachable(f"cannot reach {self.url}: {e}") from e

    # -- routes -----------------------------------------------------------------------------------

    def generate(self, body: dict) -> Any:
        return self.json("POST", "/generate", body)

    def generate_stream(self, body: dict) -> Iterator[dict]:
        return self.stream("/generate", {**body, "stream": True})

    def chat(self, body: dict) -> dict:
        return self.json("POST", "/v1/chat/completions", body)

    def chat_stream(self, body: dict) -> Iterator[dict]:
        return self.stream("/v1/chat/completions", {**body, "stream": True})

    def encode(self, texts: list[str]) -> list[dict]:
        return self.json("POST", "/encode", {"text": texts})

    def classify(self, texts: list[str]) -> list[dict]:
        return self.first_json("POST", ["/classify", "/judge"], {"text": texts})

    def health(self, generate: bool = False) -> int:
        """Status code of /health or /health_generate; raises only when there is no answer."""
        path = "/health_generate" if generate else "/health"
        return self.request("GET", path, check=False).status_code

    def flush_cache(self) -> str:
        return self.request("POST", "/flush_cache").text

    def update_weights(self, model_path: str, load_format: Optional[str] = None) -> dict:
        body = {"model_path": model_path, "load_format": load_format}
        for path in ("/update_weights_from_disk", "/update_weights"):
            resp = self.request("POST", path, body, check=False)
            if resp.status_code in (404, 405):
                continue
            if resp.status_code == 401:
                self._check(resp)
            try:
                out = resp.json()
            except ValueError:
                self._check(resp)
                raise ServerError(non_json(path, resp), resp.status_code)
            if not isinstance(out, dict) or not out.get("success", False):
                raise ServerError(error_message(resp), resp.status_code)
            return out
        raise ServerError("the server has no weight-update route", 404)

    def server_info(self) -> dict:
        return self.first_json("GET", ["/get_server_info", "/server_info", "/get_server_args"])

    def model_info(self) -> dict:
        return self.first_json("GET", ["/get_model_info", "/model_info"])

    def memory_pool_size(self) -> Optional[Any]:
        """KV pool size in tokens, or None on servers that dropped the route."""
        resp = self.request("GET", "/get_memory_pool_size", check=False)
        if resp.status_code in (404, 405):
            return None
        self._check(resp)
        return resp.json()
