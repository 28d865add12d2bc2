"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Each generation request becomes a native /generate body (the same `parse_generate` and
`TokenizerManager.submit` path /generate takes), so both APIs validate, sample and stop alike, and
a greedy chat equals /generate on the templated prompt. Logprobs are asked for with the native
fields (`return_logprob`, `logprob_start_len`, `top_logprobs_num`, `return_text_in_logprobs`) and
reshaped from the meta_info triples. Embeddings are answered by the app's own /encode route,
called in-process. Bodies are validated here (not by FastAPI), so a malformed one is a 400 in
OpenAI's envelope rather than FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nlcli.engine.chat_template import ChatTemplate, load_chat_template
from nlcli.engine.embedding_manager import NOT_EMBEDDING_MESSAGE
from nlcli.engine.http_utils import engine_rejection, finals_or_disconnect, json_response, last_output
from nlcli.engine.openai_protocol import (BadRequest, ChatCompletionRequest, CompletionRequest,
                                          EmbeddingRequest, chat_logprobs, error_body,
                                          finish_reason, legacy_logprobs, matched_stop,
                                          normalize_prompt, parse_request, sampling_dict, usage)
from nlcli.engine.tokenizer_manager import EngineDeadError, parse_generate

logger = logging.getLogger("nlcli.openai")


def register_openai_routes(app, tm, args) -> None:
    """Add the /v1 routes to the FastAPI `app` (the one /generate lives on)."""
    api = OpenAIServing(app, tm, args)
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", api.embeddings, methods=["POST"])




def _error(message: str, status: int = 400, type_: str = "BadRequestError",
           param: Optional[str] = None) -> Response:
    return json_response(error_body(message, status, type_, param), status)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


class OpenAIServing:
    def __init__(self, app, tm, args):
        self.app, self.tm, self.args = app, tm, args
        self.model_name = args.served_model_name or args.model_path
        self.created = int(time.time())
        tokenizer = getattr(tm, "tokenizer", None)
        template = load_chat_template(args.chat_template, tokenizer) if tokenizer else None
        self.chat = ChatTemplate(tokenizer, template)

    # ---- models --------------------------------------------------------------------------
    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "nl", "root": self.model_name, "max_model_len": self.tm.context_len}

    async def list_models(self):
        return json_response({"object": "list", "data": [self._card()]})

    async def get_model(self, model_id: str):
        if model_id != self.model_name:
            return _error(f"The model {model_id!r} does not exist.", 404, "NotFoundError", "model")
        return json_response(self._card())

    # ---- shared plumbing -----------------------------------------------------------------
    def _token_text(self, entry: list) -> str:
        if entry[2] is not None:
            return entry[2]
        return self.tm.tokenizer.decode([entry[1]]) if self.tm.tokenizer else str(entry[1])

    def _cached(self, metas: list[dict]) -> Optional[int]:
        if not self.args.enable_cache_report:
            return None
        return sum(m.get("cached_tokens", 0) for m in metas)

    def _submit(self, body: dict, stream: bool) -> list:
        items, _, _ = parse_generate(body)
        return self.tm.submit(items, stream)

    async def _run(self, handler, request: Request):
        try:
            return await handler(request)
        except BadRequest as e:
            return _error(str(e), param=e.param)
        except ValueError as e:
            return _error(str(e))
        except EngineDeadError as e:
            return _error(str(e), 503, "ServiceUnavailableError")

    async def _finals(self, states, request: Request) -> Optional[list[dict]]:
        """The last output of each request, or None when the client went away (all aborted)."""
        outs = await finals_or_disconnect(self.tm, states, request, lambda st: last_output(self.tm, st))
        rejected = outs and engine_rejection(outs)
        if rejected:  # the engine refusing a request (e.g. a bad grammar) is the client's error
            raise BadRequest(rejected[0])
        return outs

    async def _merged(self, states) -> AsyncIterator[tuple[int, Any]]:
        """(index, output) from all requests as they come; an exception ends the stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, st):
            try:
                async for out in self.tm.outputs(st):
                    await queue.put((i, out))
            except EngineDeadError as e:
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(states)]
        done = 0
        try:
            while done < len(states):
                i, out = await queue.get()
                if out is None:
                    done += 1
                    continue
                yield i, out
                if isinstance(out, Exception):
                    return
        finally:
            for t in tasks:
                t.cancel()
            # A client that went away leaves its requests unfinished: free them now.
            self.tm.abort([st.rid for st in states if not st.finished], "Client disconnected")

    def _usage_chunk(self, rid: str, obj: str, model: str, metas: list[dict], n: int) -> bytes:
        """The include_usage chunk: no choices; prompts counted once, not once per sample."""
        firsts = metas[::n]
        u = usage(sum(m["prompt_tokens"] for m in firsts), sum(m["completion_tokens"] for m in metas),
                  self._cached(firsts))
        return _sse({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                     "choices": [], "usage": u})

    # ---- /v1/completions -----------------------------------------------------------------
    async def completions(self, request: Request):
        return await self._run(self._completions, request)

    async def _completions(self, request: Request):
        req: CompletionRequest = parse_request(await request.body(), CompletionRequest)
        prompt = normalize_prompt(req.prompt, "prompt")
        by_ids = isinstance(prompt[0], list)
        if by_ids:
            echo_texts = [self.tm.tokenizer.decode(p) if self.tm.tokenizer else "" for p in prompt]
        else:
            echo_texts = list(prompt)
        rid = req.rid or f"cmpl-{uuid.uuid4().hex}"
        sp = sampling_dict(req, req.max_tokens)
        if req.json_schema is not None:
            sp["json_schema"] = req.json_schema
        body = {"input_ids" if by_ids else "text": prompt, "sampling_params": sp,
                "rid": [f"{rid}-{i}" for i in range(len(prompt))], "stream": req.stream}
        k = req.logprobs
        if k is not None:
            body.update(return_logprob=True, top_logprobs_num=k, return_text_in_logprobs=True,
                        logprob_start_len=0 if req.echo else -1)
        states = self._submit(body, req.stream)
        if req.stream:
            return StreamingResponse(self._stream_completion(req, states, echo_texts, rid),
                                     media_type="text/event-stream")
        outs = await self._finals(states, request)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(outs):
            meta, prefix = out["meta_info"], (echo_texts[i // req.n] if req.echo else "")
            logprobs = None
            if k is not None:
                logprobs = self._legacy(meta, k, req.echo, 0 if req.echo else len(echo_texts[i // req.n]))
            choices.append({"index": i, "text": prefix + out["text"], "logprobs": logprobs,
                            "finish_reason": finish_reason(meta["finish_reason"]),
                            "matched_stop": matched_stop(meta["finish_reason"])})
        metas = [o["meta_info"] for o in outs]
        firsts = metas[::req.n]
        return json_response({"id": rid, "object": "text_completion", "created": int(time.time()),
                      "model": req.model, "choices": choices,
                      "usage": usage(sum(m["prompt_tokens"] for m in firsts),
                                     sum(m["completion_tokens"] for m in metas), self._cached(firsts))})

    def _legacy(self, meta: dict, k: int, with_prompt: bool, offset0: int,
                out_from: int = 0) -> Optional[dict]:
        if "output_token_logprobs" not in meta:
            logger.warning("The engine returned no logprobs; answering logprobs: null")
            return None
        entries = list(meta["output_token_logprobs"][out_from:])
        tops = list((meta.get("output_top_logprobs") or [])[out_from:])
        if with_prompt:
            n_in = len(meta.get("input_token_logprobs") or [])
            entries = list(meta.get("input_token_logprobs") or []) + entries
            tops = (list(meta.get("input_top_logprobs") or []) + [None] * n_in)[:n_in] + tops
        return legacy_logprobs(entries, tops, k, self._token_text, offset0)

    async def _stream_completion(self, req, states, echo_texts, rid) -> AsyncIterator[bytes]:
        n, sent = req.n, [""] * len(states)
        sent_lp, offsets, first = [0] * len(states), [0] * len(states), [True] * len(states)
        finals: dict[int, dict] = {}
        async for i, out in self._merged(states):
            if isinstance(out, Exception):
                yield _sse({"error": error_body(str(out), 503, "ServiceUnavailableError")})
                break
            meta = out["meta_info"]
            delta = out["text"][len(sent[i]):]
            sent[i] = out["text"]
            echo = req.echo and first[i]
            if echo:
                delta = echo_texts[i // n] + delta
            logprobs = None
            if req.logprobs is not None:
                if first[i] and not req.echo:
                    offsets[i] = len(echo_texts[i // n])
                logprobs = self._legacy(meta, req.logprobs, echo, offsets[i], sent_lp[i])
                sent_lp[i] = len(meta.get("output_token_logprobs") or [])
                if logprobs:
                    offsets[i] += sum(len(t) for t in logprobs["tokens"])
            first[i] = False
            fr = meta["finish_reason"]
            if fr is not None:
                finals[i] = meta
            elif not delta and not (logprobs and logprobs["tokens"]):
                continue
            yield _sse({"id": rid, "object": "text_completion", "created": int(time.time()),
                        "model": req.model, "choices": [{
                            "index": i, "text": delta, "logprobs": logprobs,
                            "finish_reason": finish_reason(fr), "matched_stop": matched_stop(fr)}],
                        "usage": None})
        if req.stream_options and req.stream_options.include_usage and len(finals) == len(states):
            yield self._usage_chunk(rid, "text_completion", req.model,
                                    [finals[i] for i in range(len(states))], n)
        yield b"data: [DONE]\n\n"

    # ---- /v1/chat/completions ------------------------------------------------------------
    async def chat_completions(self, request: Request):
        return await self._run(self._chat, request)

    async def _chat(self, request: Request):
        req: ChatCompletionRequest = parse_request(await request.body(), ChatCompletionRequest)
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs requires logprobs to be true.", "top_logprobs")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prompt = self.chat.render(messages, req.tools, req.continue_final_message,
                                  req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = sampling_dict(req, max_tokens)
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            sp["json_schema"] = '{"type": "object"}'
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise BadRequest("response_format json_schema needs json_schema.schema.",
                                  "response_format")
            sp["json_schema"] = orjson.dumps(fmt.json_schema.schema_).decode()
        rid = req.rid or f"chatcmpl-{uuid.uuid4().hex}"
        body = {"input_ids": [prompt.input_ids], "sampling_params": sp, "rid": [rid],
                "stream": req.stream}
        k = req.top_logprobs or 0
        if req.logprobs:
            body.update(return_logprob=True, top_logprobs_num=k, return_text_in_logprobs=True,
                        logprob_start_len=-1)
        states = self._submit(body, req.stream)
        if req.stream:
            return StreamingResponse(self._stream_chat(req, states, k, rid),
                                     media_type="text/event-stream")
        outs = await self._finals(states, request)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            choices.append({"index": i, "message": {"role": "assistant", "content": out["text"]},
                            "logprobs": self._chat_lp(meta, k) if req.logprobs else None,
                            "finish_reason": finish_reason(meta["finish_reason"]),
                            "matched_stop": matched_stop(meta["finish_reason"])})
        metas = [o["meta_info"] for o in outs]
        return json_response({"id": rid, "object": "chat.completion", "created": int(time.time()),
                      "model": req.model, "choices": choices,
                      "usage": usage(metas[0]["prompt_tokens"],
                                     sum(m["completion_tokens"] for m in metas),
                                     self._cached(metas[:1]))})

    def _chat_lp(self, meta: dict, k: int, out_from: int = 0) -> Optional[dict]:
        if "output_token_logprobs" not in meta:
            logger.warning("The engine returned no logprobs; answering logprobs: null")
            return None
        return chat_logprobs(meta["output_token_logprobs"][out_from:],
                             (meta.get("output_top_logprobs") or [])[out_from:], k, self._token_text)

    async def _stream_chat(self, req, states, k: int, rid: str) -> AsyncIterator[bytes]:
        sent, sent_lp = [""] * len(states), [0] * len(states)
        first, finals = [True] * len(states), {}

        def chunk(i, delta, logprobs=None, fr=None):
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": req.model, "choices": [{
                             "index": i, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish_reason(fr), "matched_stop": matched_stop(fr)}],
                         "usage": None})

        async for i, out in self._merged(states):
            if isinstance(out, Exception):
                yield _sse({"error": error_body(str(out), 503, "ServiceUnavailableError")})
                break
            if first[i]:
                first[i] = False
                yield chunk(i, {"role": "assistant"})
            meta = out["meta_info"]
            delta = out["text"][len(sent[i]):]
            sent[i] = out["text"]
            logprobs = None
            if req.logprobs:
                logprobs = self._chat_lp(meta, k, sent_lp[i])
                sent_lp[i] = len(meta.get("output_token_logprobs") or [])
            fr = meta["finish_reason"]
            if fr is not None:
                finals[i] = meta
            elif not delta and not (logprobs and logprobs["content"]):
                continue
            yield chunk(i, {"content": delta}, logprobs, fr)
        if req.stream_options and req.stream_options.include_usage and len(finals) == len(states):
            yield self._usage_chunk(rid, "chat.completion.chunk", req.model,
                                    [finals[i] for i in range(len(states))], len(states))
        yield b"data: [DONE]\n\n"

    # ---- /v1/embeddings ------------------------------------------------------------------
    async def embeddings(self, request: Request):
        return await self._run(self._embeddings, request)

    async def _embeddings(self, request: Request):
        import httpx

        req: EmbeddingRequest = parse_request(await request.body(), EmbeddingRequest)
        ready = getattr(self.tm, "ready", None)
        if ready is not None and ready.is_generation:
            raise BadRequest(NOT_EMBEDDING_MESSAGE)
        inp = normalize_prompt(req.input, "input")
        body = {"input_ids" if isinstance(inp[0], list) else "text": inp}
        # The native route owns embedding (pooling, normalization); answering through it keeps
        # /v1/embeddings equal to /encode by construction.
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nl", timeout=None) as c:
            r = await c.post("/encode", json=body)
        if r.status_code in (404, 405):
            return _error("This server has no /encode route, so it cannot serve embeddings.", 501,
                          "NotImplementedError")
        out = r.json()
        if r.status_code != 200:
            msg = out.get("error", {}).get("message") if isinstance(out, dict) else None
            return _error(msg or r.text, r.status_code)
        outs = out if isinstance(out, list) else [out]
        data = []
        for i, o in enumerate(outs):
            emb = o["embedding"]
            if req.encoding_format == "base64":
                import numpy as np

                emb = base64.b64encode(np.asarray(emb, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        p = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return json_response({"object": "list", "data": data, "model": self.model_name,
                      "usage": {"prompt_tokens": p, "total_tokens": p, "completion_tokens": 0,
                                "prompt_tokens_details": None}})
