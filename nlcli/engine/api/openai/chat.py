"""/v1/chat/completions: messages rendered by the chat template into one prompt of token ids, then
native generation items (so a greedy chat equals /generate on the templated prompt), answered
whole or as chat.completion.chunk deltas; `response_format` becomes a JSON-schema constraint and
`logprobs` / `top_logprobs` the chat-style logprobs.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Optional

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse

from nlcli.engine.api.native_input import LogprobArgs
from nlcli.engine.api.openai.chat_template import ChatTemplate, load_chat_template
from nlcli.engine.api.openai.protocol import (BadRequest, ChatCompletionRequest, chat_logprobs,
                                              sampling_dict)
from nlcli.engine.api.openai.serving import OpenAIServing, choice
from nlcli.engine.api.prepare import INLINE_TEXT_CHARS
from nlcli.engine.limits import check_text_len

OBJECT, CHUNK_OBJECT = "chat.completion", "chat.completion.chunk"


class ChatServing(OpenAIServing):
    def __init__(self, tm, args):
        super().__init__(tm, args)
        tokenizer = getattr(tm, "tokenizer", None)
        # Loaded at start-up, so a missing --chat-template file stops the server there.
        template = load_chat_template(args.chat_template, tokenizer) if tokenizer else None
        self.chat = ChatTemplate(tokenizer, template)

    async def serve(self, request: Request):
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        body_len = len(await request.body())  # Starlette keeps the body: no second read
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs requires logprobs to be true.", "top_logprobs")
        # Too long for the context whatever it tokenizes to: refused before rendering.
        check_text_len(sum(_chars(m.content) for m in req.messages), self.tm.context_len,
                       self.tm.chars_per_token)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]

        def render():
            return self.chat.render(messages, req.tools, req.continue_final_message,
                                    req.chat_template_kwargs)

        # Templating and tokenizing a big conversation runs off the event loop.
        prompt = await asyncio.to_thread(render) if body_len > INLINE_TEXT_CHARS else render()
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
        k = req.top_logprobs or 0
        lp = LogprobArgs()
        if req.logprobs:
            lp = LogprobArgs(return_logprob=True, top_logprobs_num=k, return_text_in_logprobs=True)
        states = await self._submit([prompt.input_ids], sp, [rid], req.stream, lp,
                                    req.custom_logit_processor)
        if req.stream:
            return StreamingResponse(self._stream_chat(req, states, k, rid),
                                     media_type="text/event-stream")

        def choice_of(i: int, out: dict) -> dict:
            meta = out["meta_info"]
            return choice(i, "message", {"role": "assistant", "content": out["text"]},
                          self._chat_lp(meta, k) if req.logprobs else None, meta["finish_reason"])

        # One prompt for all samples: usage counts it once.
        return await self._respond(request, states, rid, OBJECT, req.model, len(states), choice_of)

    def _chat_lp(self, meta: dict, k: int, out_from: int = 0) -> Optional[dict]:
        got = self._output_logprobs(meta, out_from)
        return None if got is None else chat_logprobs(*got, k, self._token_text)

    def _stream_chat(self, req, states, k: int, rid: str):
        sent, sent_lp, first = [""] * len(states), [0] * len(states), [True] * len(states)

        def choices_of(i: int, out: dict) -> list:
            chunks = []
            if first[i]:  # each choice opens with a role-only delta
                first[i] = False
                chunks.append(choice(i, "delta", {"role": "assistant"}, None, None))
            meta = out["meta_info"]
            delta = out["text"][len(sent[i]):]
            sent[i] = out["text"]
            logprobs = None
            if req.logprobs:
                logprobs = self._chat_lp(meta, k, sent_lp[i])
                sent_lp[i] = len(meta.get("output_token_logprobs") or [])
            fr = meta["finish_reason"]
            if fr is not None or delta or (logprobs and logprobs["content"]):
                chunks.append(choice(i, "delta", {"content": delta}, logprobs, fr))
            return chunks

        return self._stream(req, states, rid, CHUNK_OBJECT, len(states), choices_of)


def _chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(getattr(part, "text", "") or "") for part in content or [])
