"""A fake nl server speaking API_SPEC's shapes, for the CLI tests, and the fixtures that start it.

The "model" writes a fixed sentence one word per token, which is enough to exercise streaming,
stop strings, length limits, token counts and prefix-cache accounting. The fixtures `server_url`,
`auth_server_url` and `embed_server_url` are what the CLI tests use; pointing them at a real
`nl serve` is a one-line change each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from nlcli.engine.args import ServerArgs

WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]
EOS_ID = 2
FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)
SAMPLING_KEYS = {
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "stop", "stop_token_ids",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n",
    "regex", "json_schema", "ebnf", "sampling_seed",
}


@dataclass
class FakeState:
    api_key: Optional[str] = None
    is_embedding: bool = False
    healthy: bool = True
    model_path: str = "fake/SmolLM2-135M-Instruct"
    token_delay: float = 0.0  # seconds between streamed tokens
    seen_prompts: set = field(default_factory=set)


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=400)


def check_sampling(params: dict) -> Optional[str]:
    for key in params:
        if key not in SAMPLING_KEYS:
            return f"Unknown sampling parameter: '{key}'"
    if params.get("temperature", 1.0) < 0:
        return f"temperature must be non-negative, got {params['temperature']}."
    top_p = params.get("top_p", 1.0)
    if not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p}."
    top_k = params.get("top_k", -1)
    if top_k != -1 and top_k < 1:
        return f"top_k must be -1 (disable), or at least 1, got {top_k}."
    if (params.get("max_new_tokens") or 0) < 0:
        return f"max_new_tokens must be at least 0, got {params['max_new_tokens']}."
    if params.get("regex") and params.get("json_schema"):
        return "regex and json_schema cannot be both set."
    return None


def run_fake_model(state: FakeState, prompt: str, params: dict) -> list[tuple[str, dict]]:
    """Cumulative (text, meta_info) after each token, the last one finished."""
    prompt_tokens = max(len(prompt.split()), 1)
    cached = prompt_tokens - 1 if prompt in state.seen_prompts else 0
    state.seen_prompts.add(prompt)
    limit = params.get("max_new_tokens", 128)
    limit = 1 << 30 if limit is None else limit
    stops = params.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    rid = uuid.uuid4().hex

    def meta(n: int, finish: Optional[dict]) -> dict:
        return {"id": rid, "finish_reason": finish, "prompt_tokens": prompt_tokens,
                "completion_tokens": n, "cached_tokens": cached}

    if limit == 0:
        return [("", meta(0, {"type": "length", "length": 0}))]
    text, out = "", []
    for i, word in enumerate(WORDS + [None]):
        finish = None
        if word is None:
            finish = {"type": "stop", "matched": EOS_ID}
        else:
            text += word
            hit = next((s for s in stops if s in text), None)
            if hit is not None:
                text, finish = text[: text.index(hit)], {"type": "stop", "matched": hit}
        if finish is None and i + 1 >= limit:
            finish = {"type": "length", "length": limit}
        out.append((text, meta(i + 1, finish)))
        if finish is not None:
            break
    return out


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def api_key_check(request: Request, call_next: Any) -> Response:
        if state.api_key and not request.url.path.startswith("/health"):
            if request.headers.get("authorization") != f"Bearer {state.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    async def sse(events: list[Any]) -> Any:
        for event in events:
            if state.token_delay:
                await asyncio.sleep(state.token_delay)
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        body = await request.json()
        if state.is_embedding:
            return PlainTextResponse("Internal Server Error", status_code=500)
        if body.get("text") is None and body.get("input_ids") is None:
            return _bad("Either text, input_ids or input_embeds should be provided.")
        params = body.get("sampling_params") or {}
        err = check_sampling(params)
        if err:
            return _bad(err)
        steps = run_fake_model(state, str(body.get("text", body.get("input_ids"))), params)
        if body.get("stream"):
            events = [{"text": t, "meta_info": m} for t, m in steps]
            return StreamingResponse(sse(events), media_type="text/event-stream")
        text, meta = steps[-1]
        return JSONResponse({"text": text, "meta_info": meta})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in body["messages"])
        params = {"max_new_tokens": body.get("max_tokens"), "stop": body.get("stop")}
        for key in ("temperature", "top_p", "top_k", "regex"):
            if key in body:
                params[key] = body[key]
        err = check_sampling({k: v for k, v in params.items() if v is not None})
        if err:
            return JSONResponse({"object": "error", "message": err, "type": "BadRequestError",
                                 "param": None, "code": 400}, status_code=400)
        steps = run_fake_model(state, prompt, params)
        text, meta = steps[-1]
        finish = meta["finish_reason"]
        matched = finish.get("matched") if finish else None
        p, c = meta["prompt_tokens"], meta["completion_tokens"]
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                 "prompt_tokens_details": None}
        base = {"id": meta["id"], "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish["type"], "matched_stop": matched}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                                 "usage": usage})
        def chunk(delta: dict, f: Optional[dict]) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": f["type"] if f else "", "matched_stop": matched if f else None}
            return {**base, "object": "chat.completion.chunk", "usage": None, "choices": [choice]}

        chunks, prev = [chunk({"role": "assistant", "content": ""}, None)], ""
        for t, m in steps:
            chunks.append(chunk({"content": t[len(prev):]}, m["finish_reason"]))
            prev = t
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"id": uuid.uuid4().hex, "choices": [], "model": body.get("model"),
                           "usage": usage})
        return StreamingResponse(sse(chunks), media_type="text/event-stream")

    def embed(text: str, dim: int) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        return [(b - 128) / 128 for b in digest[:dim]]

    async def embedding_route(request: Request, dim: int) -> Response:
        body = await request.json()
        if not state.is_embedding:
            return _bad("This model does not appear to be an embedding model by default. Please "
                        "add `--is-embedding` when launching the server or try another model.")
        texts = body.get("text")
        if texts is None:
            return _bad("Either text or input_ids should be provided.")
        single = isinstance(texts, str)
        items = [{"embedding": embed(t, dim),
                  "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": len(t.split())}}
                 for t in ([texts] if single else texts)]
        return JSONResponse(items[0] if single else items)

    @app.api_route("/encode", methods=["POST", "PUT"])
    async def encode(request: Request) -> Response:
        return await embedding_route(request, 16)

    @app.api_route("/classify", methods=["POST", "PUT"])
    async def classify(request: Request) -> Response:
        return await embedding_route(request, 1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    def server_args() -> dict:
        return ServerArgs(model_path=state.model_path, api_key=state.api_key,
                          is_embedding=state.is_embedding).to_dict()

    @app.get("/get_server_info")
    async def server_info() -> Response:
        return JSONResponse({**server_args(), "status": "ready", "max_total_num_tokens": 4096,
                             "version": "fake"})

    @app.get("/get_model_info")
    async def model_info() -> Response:
        return JSONResponse({"model_path": state.model_path, "tokenizer_path": state.model_path,
                             "is_generation": not state.is_embedding})

    @app.api_route("/get_memory_pool_size", methods=["GET", "POST"])
    async def pool_size() -> Response:
        return JSONResponse(4096)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        state.seen_prompts.clear()
        return PlainTextResponse(FLUSH_TEXT)

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> Response:
        path = (await request.json())["model_path"]
        if not os.path.exists(path):
            return JSONResponse({"success": False, "message": "Failed to get weights iterator: "
                                 f"{path} (repository not found)."}, status_code=400)
        state.model_path = path
        return JSONResponse({"success": True, "message": "Succeeded to update model weights."})

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """uvicorn in a background thread; `with FakeServer(...) as srv:` gives srv.url."""

    def __init__(self, state: Optional[FakeState] = None, port: Optional[int] = None):
        self.state = state or FakeState()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "FakeServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


TEST_API_KEY = "sk-test-secret-7f3a"


@pytest.fixture(scope="session")
def server_url() -> Any:
    """A generation server: the fake, or a running `nl serve` named by NL_TEST_SERVER_URL."""
    if os.environ.get("NL_TEST_SERVER_URL"):
        yield os.environ["NL_TEST_SERVER_URL"]
        return
    with FakeServer() as srv:
        yield srv.url


@pytest.fixture(scope="session")
def auth_server_url() -> Any:
    """A generation server started with --api-key TEST_API_KEY."""
    with FakeServer(FakeState(api_key=TEST_API_KEY)) as srv:
        yield srv.url


@pytest.fixture(scope="session")
def embed_server_url() -> Any:
    """An embedding server (--is-embedding)."""
    with FakeServer(FakeState(is_embedding=True)) as srv:
        yield srv.url
