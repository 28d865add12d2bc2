"""The FastAPI app: the native SGLang routes, and the assembly of everything else in front of and
beside them.

The OpenAI /v1 routes are added by openai/routes.py (/v1/rerank by openai/rerank.py), /encode
/classify /judge by encode.py, the weight-update routes by update_weights.py, /pause_generation and
/continue_generation by pause.py, /metrics by metrics.py; 404/405 envelopes are errors.py's; the
pure-ASGI middleware (API key, body-size cap) is middleware.py's, CORS is Starlette's (also pure
ASGI).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from nlcli import __version__
from nlcli.engine.api.encode import NOT_GENERATION_MESSAGE, register_embedding_routes
from nlcli.engine.api.engine_health import probe_generate
from nlcli.engine.api.errors import install_error_handlers
from nlcli.engine.api.flush import FlushManager
from nlcli.engine.api.http_utils import (engine_rejection, finals_or_disconnect, json_response,
                                         last_output, native_error, read_json)
from nlcli.engine.api.middleware import (ApiKeyMiddleware, BodyLimitMiddleware,
                                         ErrorEnvelopeMiddleware)
from nlcli.engine.api.native_input import parse_generate
from nlcli.engine.api.openai.rerank import register_rerank_routes
from nlcli.engine.api.pause import register_pause_routes
from nlcli.engine.api.tokenizer_manager import EngineDeadError, TokenizerManager
from nlcli.engine.api.update_weights import register_weight_update_routes

logger = logging.getLogger("nlcli.http")

FLUSH_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are running "
              "or waiting requests, the operation will not be performed.)\n")


# ---- the app ---------------------------------------------------------------------------------
def create_app(args, tm: TokenizerManager, model_info: dict) -> Any:
    app = FastAPI(title="nl", version=__version__)
    # Inside FastAPI's own error layer, so an unexpected exception never reaches it (a bare 500).
    app.add_middleware(ErrorEnvelopeMiddleware)
    app.state.tm = tm
    # A weight update changes model_path / load_format; the info routes read the current args.
    app.state.server_args = args
    install_error_handlers(app)  # 404/405 in nl's envelopes, never FastAPI's {"detail": ...}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        if tm.ready is not None and not tm.ready.is_generation:
            return native_error(NOT_GENERATION_MESSAGE)
        try:
            items, is_batch, stream = parse_generate(await read_json(request))
            states = await tm.submit(items, stream)
        except ValueError as e:
            return native_error(str(e))
        except EngineDeadError as e:
            return native_error(str(e), 503)
        if stream:
            return StreamingResponse(_stream(tm, states, is_batch), media_type="text/event-stream")
        return await _wait_all(tm, states, is_batch, request)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if tm.is_healthy() else 503)

    @app.get("/health_generate")
    async def health_generate():
        return Response(status_code=200 if await probe_generate(tm) else 503)

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name (sglang-router asks it first)
    async def get_model_info():
        return json_response(model_info)

    @app.get("/get_server_args")
    async def get_server_args():
        return json_response(app.state.server_args.public_dict())

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        info = app.state.server_args.public_dict()
        info.update(status="ready", max_total_num_tokens=tm.pool_size, version=__version__,
                    internal_states=tm.internal_states())
        return json_response(info)

    @app.api_route("/get_memory_pool_size", methods=["GET", "POST"])
    async def get_memory_pool_size():
        return json_response(tm.pool_size)

    flusher = FlushManager(tm)

    @app.post("/flush_cache")
    async def flush_cache():
        try:
            ok = await flusher.flush()
        except (EngineDeadError, asyncio.TimeoutError):
            return Response(status_code=503)
        # Upstream later answers a refused flush with 400; the body text stays the same.
        return Response(FLUSH_TEXT, status_code=200 if ok else 400, media_type="text/plain")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("The request body must be a JSON object.")
            if body.get("abort_all") is True:
                tm.abort_all()
            elif isinstance(body.get("rid"), str):
                tm.request_abort(body["rid"])
            else:
                raise ValueError("rid must be a string (or set abort_all to true).")
        except ValueError as e:
            return native_error(str(e))
        return Response(status_code=200)

    from nlcli.engine.api.openai.routes import register_openai_routes

    embeddings = register_embedding_routes(app, tm, args)  # /encode, /classify, /judge
    register_openai_routes(app, tm, args, embeddings)
    register_rerank_routes(app, tm, args, embeddings)  # /v1/rerank

    def on_weights_updated(model_path: str, load_format: str) -> None:
        app.state.server_args = app.state.server_args.replace(model_path=model_path,
                                                              load_format=load_format)
        tm.set_args(app.state.server_args)
        model_info["model_path"] = model_path

    pause = register_pause_routes(app, tm)  # /pause_generation, /continue_generation
    # Paused with no request holding KV, an update need not wait for the paused requests.
    register_weight_update_routes(app, tm, on_weights_updated, skip_drain=lambda: pause.kv_free)

    if args.enable_metrics:
        from nlcli.engine.api.metrics import mount_metrics

        mount_metrics(app, tm, args)

    wrapped: Any = app
    wrapped = BodyLimitMiddleware(wrapped, args.max_request_bytes)
    if args.cors_origins:
        from starlette.middleware.cors import CORSMiddleware  # pure ASGI

        origins = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
        wrapped = CORSMiddleware(wrapped, allow_origins=origins, allow_methods=["*"],
                                 allow_headers=["*"], allow_credentials="*" not in origins)
    if args.api_key or args.admin_api_key:
        wrapped = ApiKeyMiddleware(wrapped, args.api_key, args.admin_api_key)
    return wrapped


async def _wait_all(tm: TokenizerManager, states, is_batch: bool, request: Request) -> Response:
    try:
        outs = await finals_or_disconnect(tm, states, request, lambda st: last_output(tm, st))
    except EngineDeadError as e:
        return native_error(str(e), 503)
    if outs is None:
        return Response(status_code=499)
    rejected = engine_rejection(outs)
    if rejected:  # e.g. a grammar the engine could not compile: the client's error, not a 200
        message, status = rejected
        if status == 503:  # a timeout or a full queue: SGLang's flat error object, plus ours
            return json_response({"error": {"message": message}, "object": "error",
                                  "message": message, "type": "503", "param": None,
                                  "code": 503}, 503)
        return native_error(message, status)
    return json_response(outs if is_batch else outs[0])


async def _stream(tm: TokenizerManager, states, is_batch: bool):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, st):
        try:
            async for out in tm.outputs(st):
                if is_batch:
                    out = {**out, "index": index}
                await queue.put(out)
        except EngineDeadError as e:
            await queue.put({"error": {"message": str(e)}})
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(states)]
    done = 0
    try:
        while done < len(states):
            out = await queue.get()
            if out is None:
                done += 1
                continue
            yield b"data: " + orjson.dumps(out) + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        # A client that went away leaves its requests unfinished: free them now.
        tm.abort([st.rid for st in states if not st.finished], "Client disconnected")
