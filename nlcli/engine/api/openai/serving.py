"""What every /v1 route shares: the OpenAIServing base (the endpoint wrapper that turns errors into
OpenAI's envelope, submitting native generation items, waiting for finals, merging streams) and
the one answer shape both generation routes use, non-streaming and streaming.

Generation requests become native `GenItem`s (`gen_items`) and go through
`TokenizerManager.submit`, the same path /generate takes, so both APIs validate, sample and stop
alike. Bodies are validated by the routes
(not by FastAPI), so a malformed one is a 400 in OpenAI's envelope rather than FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

import orjson
from fastapi import Request
from fastapi.responses import Response

from nlcli.engine.api.http_utils import (engine_rejection, finals_or_disconnect, json_response,
                                         last_output)
from nlcli.engine.api.native_input import LogprobArgs, gen_items
from nlcli.engine.api.openai.protocol import (BadRequest, error_body, finish_reason, matched_stop,
                                              parse_request, usage)
from nlcli.engine.api.req_state import EngineDeadError
from nlcli.engine.api.token_only import no_tokenizer_route

logger = logging.getLogger("nlcli.openai")

# Builds the choices one engine output contributes: (index, output) -> choice dicts.
ChoicesOf = Callable[[int, dict], list]


def error_response(message: str, status: int = 400, type_: str = "BadRequestError",
                   param: Optional[str] = None) -> Response:
    return json_response(error_body(message, status, type_, param), status)


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


def choice(i: int, key: str, payload: Any, logprobs: Optional[dict], fr: Optional[dict]) -> dict:
    """One choice: `key` is "text" (completions), "message" or "delta" (chat)."""
    return {"index": i, key: payload, "logprobs": logprobs, "finish_reason": finish_reason(fr),
            "matched_stop": matched_stop(fr)}


class _EngineFailed(RuntimeError):
    """The engine ended the request with a 5xx: a step raised (500), or a deadline or the queue
    cap (503); not the client's fault."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class OpenAIServing:
    """One /v1 route: `handle` is its FastAPI endpoint, `serve` (per subclass) does the work."""

    # Routes that speak text answer 400 on a --skip-tokenizer-init server.
    needs_tokenizer = True

    def __init__(self, tm, args):
        self.tm, self.args = tm, args
        self.model_name = args.served_model_name or args.model_path

    async def handle(self, request: Request):
        if self.needs_tokenizer and self.tm.tokenizer is None:
            return error_response(no_tokenizer_route(request.url.path))
        try:
            return await self.serve(request)
        except BadRequest as e:
            return error_response(str(e), param=e.param)
        except ValueError as e:
            return error_response(str(e))
        except EngineDeadError as e:
            return error_response(str(e), 503, "ServiceUnavailableError")
        except _EngineFailed as e:
            kind = "ServiceUnavailableError" if e.status == 503 else "InternalServerError"
            return error_response(str(e), e.status, kind)

    async def serve(self, request: Request):
        raise NotImplementedError

    async def parse(self, request: Request, model: type) -> Any:
        """The validated body (fields nl would ignore are a 400 naming them). OpenAI only records
        `user`, so nl does the same: --log-requests logs it."""
        req = parse_request(await request.body(), model)
        if getattr(req, "user", None) and getattr(self.args, "log_requests", False):
            logger.info("%s request from user=%r", request.url.path, req.user)
        return req

    # ---- generation plumbing -------------------------------------------------------------
    async def _submit(self, prompts: list, sampling: dict, rids: list[str], stream: bool,
                      logprobs: LogprobArgs = LogprobArgs(),
                      custom_logit_processor: Optional[str] = None) -> list:
        """The native path with typed items: the same validation, sampling and stops as
        /generate."""
        items = gen_items(prompts, sampling, rids, logprobs, custom_logit_processor)
        return await self.tm.submit(items, stream)

    def _token_text(self, entry: list) -> str:
        if entry[2] is not None:
            return entry[2]
        return self.tm.tokenizer.decode([entry[1]]) if self.tm.tokenizer else str(entry[1])

    def _output_logprobs(self, meta: dict, out_from: int) -> Optional[tuple[list, list]]:
        """(entries, tops) of the output tokens from `out_from` on; None when the engine sent none."""
        if "output_token_logprobs" not in meta:
            logger.warning("The engine returned no logprobs; answering logprobs: null")
            return None
        return (list(meta["output_token_logprobs"][out_from:]),
                list((meta.get("output_top_logprobs") or [])[out_from:]))

    def _usage(self, metas: list[dict], n: int) -> dict:
        """Usage over all samples; each prompt (one per `n` samples) is counted once."""
        firsts = metas[::n]
        cached = sum(m.get("cached_tokens", 0) for m in firsts) if self.args.enable_cache_report else None
        return usage(sum(m["prompt_tokens"] for m in firsts),
                     sum(m["completion_tokens"] for m in metas), cached)

    async def _finals(self, states, request: Request) -> Optional[list[dict]]:
        """The last output of each request, or None when the client went away (all aborted)."""
        outs = await finals_or_disconnect(self.tm, states, request, lambda st: last_output(self.tm, st))
        rejected = outs and engine_rejection(outs)
        if rejected:
            message, status = rejected
            if status >= 500:  # a failed engine step, a timeout, a full queue
                raise _EngineFailed(message, status)
            raise BadRequest(message)  # the engine refusing a request (e.g. a bad grammar)
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

    # ---- the answer, whole or streamed ---------------------------------------------------
    async def _respond(self, request: Request, states, rid: str, obj: str, model: str, n: int,
                       choice_of: Callable[[int, dict], dict]) -> Response:
        """The non-streaming answer: one choice per request, usage over them all (499 when the
        client went away first)."""
        outs = await self._finals(states, request)
        if outs is None:
            return Response(status_code=499)
        choices = [choice_of(i, out) for i, out in enumerate(outs)]
        return json_response({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                              "choices": choices,
                              "usage": self._usage([o["meta_info"] for o in outs], n)})

    async def _stream(self, req, states, rid: str, obj: str, n: int,
                      choices_of: ChoicesOf) -> AsyncIterator[bytes]:
        """SSE: a chunk per choice `choices_of` makes of each output, the usage chunk when
        stream_options asks for it (and every request finished), then [DONE]."""
        finals: dict[int, dict] = {}
        async for i, out in self._merged(states):
            if isinstance(out, Exception):
                yield sse({"error": error_body(str(out), 503, "ServiceUnavailableError")})
                break
            if out["meta_info"]["finish_reason"] is not None:
                finals[i] = out["meta_info"]
            for c in choices_of(i, out):
                yield sse({"id": rid, "object": obj, "created": int(time.time()),
                           "model": req.model, "choices": [c], "usage": None})
        if req.stream_options and req.stream_options.include_usage and len(finals) == len(states):
            # The usage chunk has no choices.
            yield sse({"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                       "choices": [], "usage": self._usage([finals[i] for i in range(len(states))], n)})
        yield b"data: [DONE]\n\n"
