"""/v1/responses: OpenAI's Responses API on the chat path. The input (and the conversation of a
`previous_response_id`, and `instructions` as a leading system message) is rendered by the chat
route's template and run as a native generation item (the path /generate takes), so a greedy
response equals the greedy chat completion of the same messages. Answered whole, or streamed as
SGLang's event sequence (created, in_progress, output_item.added, content_part.added,
output_text.delta..., done events, then completed / incomplete / failed). Responses are kept in
a bounded in-memory store for GET /v1/responses/{id} and chaining.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai import responses_protocol as rp
from nlcli.engine.api.openai.protocol import BadRequest, parse_request
from nlcli.engine.api.openai.serving import OpenAIServing
from nlcli.engine.api.prepare import INLINE_TEXT_CHARS
from nlcli.engine.api.req_state import EngineDeadError
from nlcli.engine.limits import check_text_len


class ResponsesServing(OpenAIServing):
    def __init__(self, tm, args, chat_template):
        super().__init__(tm, args)
        self.chat = chat_template  # the chat route's ChatTemplate
        self.store = rp.ResponseStore()

    async def handle(self, request: Request):
        try:
            return await self.serve(request)
        except BadRequest as e:
            return rp.error(str(e), param=e.param)
        except ValueError as e:
            return rp.error(str(e))
        except EngineDeadError as e:
            return rp.error(str(e), 503, "server_error")
        except RuntimeError as e:  # the engine failed the request (a step raised)
            return rp.error(str(e), 500, "server_error")

    async def retrieve(self, response_id: str):
        bad = rp.check_id(response_id)
        if bad is not None:
            return bad
        got = self.store.get(response_id)
        return rp.not_found(response_id) if got is None else json_response(got[0])

    async def serve(self, request: Request):
        raw = await request.body()
        req: rp.ResponsesRequest = parse_request(raw, rp.ResponsesRequest)
        history: list[dict] = []
        if req.previous_response_id is not None:
            bad = rp.check_id(req.previous_response_id)
            if bad is not None:
                return bad
            prev = self.store.get(req.previous_response_id)
            if prev is None:
                return rp.not_found(req.previous_response_id)
            history = rp.conversation_after(*prev)
        history = history + rp.input_messages(req.input)
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        # As chat: too long for the context whatever it tokenizes to is refused before rendering,
        # and templating and tokenizing a big conversation runs off the event loop.
        messages = system + history
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        check_text_len(chars, self.tm.context_len, self.tm.chars_per_token)
        big = len(raw) + chars > INLINE_TEXT_CHARS
        prompt = (await asyncio.to_thread(self.chat.render, messages) if big
                  else self.chat.render(messages))
        rid = req.request_id or rp.new_id("resp")
        states = await self._submit([prompt.input_ids], rp.sampling_params(req), [rid], req.stream)
        model, created = req.model or self.model_name, rp.now()
        if req.stream:
            return StreamingResponse(self._events(req, states, rid, model, created, history),
                                     media_type="text/event-stream")
        outs = await self._finals(states, request)
        if outs is None:
            return Response(status_code=499)
        meta = outs[0]["meta_info"]
        item = rp.message_item(rp.new_id("msg"), outs[0]["text"])
        obj = rp.response_object(req, rid, model, created, rp.status_of(meta["finish_reason"]),
                                 [item], meta)
        self._keep(req, obj, history)
        return json_response(obj)

    def _keep(self, req: rp.ResponsesRequest, obj: dict, history: list[dict]) -> None:
        if req.store:
            self.store.put(obj, history)

    async def _events(self, req, states, rid: str, model: str, created: int, history: list[dict]):
        seq = 0

        def event(kind: str, **data) -> bytes:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            return f"event: {kind}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"

        item_id = rp.new_id("msg")
        start = rp.response_object(req, rid, model, created, "in_progress", [])
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        yield event("response.output_item.added", output_index=0,
                    item=rp.message_item(item_id, "", "in_progress"))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield event("response.content_part.added", **where, part=rp.output_text(""))
        text, meta = "", None
        async for _, out in self._merged(states):
            if isinstance(out, Exception):
                meta = {"finish_reason": {"type": "abort", "message": str(out)},
                        "prompt_tokens": 0, "completion_tokens": 0}
                break
            delta, text = out["text"][len(text):], out["text"]
            if delta:
                yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
            if out["meta_info"]["finish_reason"] is not None:
                meta = out["meta_info"]
        if meta is None:  # the client went away: nothing more to say
            return
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=rp.output_text(text))
        item = rp.message_item(item_id, text)
        yield event("response.output_item.done", output_index=0, item=item)
        status = rp.status_of(meta["finish_reason"])
        obj = rp.response_object(req, rid, model, created, status, [item], meta)
        self._keep(req, obj, history)
        yield event({"completed": "response.completed", "incomplete": "response.incomplete",
                     "failed": "response.failed"}[status], response=obj)


def register_responses_routes(app, tm, args, chat_template) -> None:
    serving = ResponsesServing(tm, args, chat_template)
    app.add_api_route("/v1/responses", serving.handle, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", serving.retrieve, methods=["GET"])


