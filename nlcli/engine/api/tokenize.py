"""/tokenize and /detokenize (also under /v1): text to token ids and back, as SGLang serves them.

Bodies and answers are SGLang's (`{"tokens", "count", "max_model_len"}`, `{"text"}`, a list form
for a batch), and so is the error envelope: the flat OpenAI error object on both paths. The work
runs in one worker thread with its own copy of the tokenizer, so a large input never stalls the
event loop and never races the loop's tokenizer (HF fast tokenizers mutate their truncation
state). The request-size bound is the server's body limit middleware, in front of every route.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, model_validator

from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.protocol import BadRequest, ChatMessage, parse_request
from nlcli.engine.api.openai.serving import OpenAIServing

_INT64 = 2 ** 63


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = None
    prompt: Optional[Union[str, list[str]]] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[dict[str, Any]]] = None
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = True
    add_generation_prompt: Optional[bool] = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Exactly one of 'prompt' or 'messages' must be provided.")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = None
    tokens: Any
    skip_special_tokens: bool = True


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class TokenizerThread:
    """One worker thread and a private copy of the tokenizer that only it uses."""

    def __init__(self, tokenizer):
        self.source = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._tok = None
        self._tok_lock = threading.Lock()

    def tokenizer(self):
        """A private copy of the tokenizer, only ever used in the worker thread."""
        with self._tok_lock:
            if self._tok is None:
                self._tok = copy.deepcopy(self.source)
            return self._tok

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


class TokenizeServing(OpenAIServing):
    """POST /tokenize and /v1/tokenize (`handle` maps errors to the OpenAI envelope)."""

    def __init__(self, tm, args, chat_template, worker: TokenizerThread):
        super().__init__(tm, args)
        self.chat = chat_template  # the chat route's ChatTemplate: messages render as for chat
        self.worker = worker

    def _max_model_len(self) -> int:
        n = getattr(self.tm.tokenizer, "model_max_length", -1)
        # HF's "no limit" sentinel (about 1e30) is not a length: report the served context.
        return n if isinstance(n, int) and -_INT64 <= n < _INT64 else self.tm.context_len

    async def serve(self, request: Request):
        req: TokenizeRequest = parse_request(await request.body(), TokenizeRequest)
        if self.tm.tokenizer is None:
            raise BadRequest("This server has no tokenizer.")
        if req.messages is not None:
            if req.add_generation_prompt is False:
                raise BadRequest("add_generation_prompt=false is not supported; messages are "
                                 "rendered as for a chat completion.", "add_generation_prompt")
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            # On the loop, exactly as /v1/chat/completions renders (templates are small work).
            prompt = self.chat.render(messages, req.tools, req.continue_final_message,
                                      req.chat_template_kwargs)
            tokens: Any = prompt.input_ids
            count: Any = len(tokens)
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)

            def encode() -> list[list[int]]:
                tok = self.worker.tokenizer()
                return [list(tok.encode(t, add_special_tokens=req.add_special_tokens)) for t in texts]

            ids = await self.worker.run(encode)
            tokens, count = (ids[0], len(ids[0])) if isinstance(req.prompt, str) else (
                ids, [len(x) for x in ids])
        return json_response({"tokens": tokens, "count": count,
                              "max_model_len": self._max_model_len()})



class DetokenizeServing(OpenAIServing):
    """POST /detokenize and /v1/detokenize."""

    def __init__(self, tm, args, worker: TokenizerThread):
        super().__init__(tm, args)
        self.worker = worker

    async def serve(self, request: Request):
        req: DetokenizeRequest = parse_request(await request.body(), DetokenizeRequest)
        if self.tm.tokenizer is None:
            raise BadRequest("This server has no tokenizer.")
        tokens = req.tokens
        if not isinstance(tokens, list):
            raise BadRequest(f"Invalid tokens type: {type(tokens).__name__}. Expected List[int] or "
                             "List[List[int]].", "tokens")
        batch = bool(tokens) and all(isinstance(t, list) for t in tokens)
        seqs = tokens if batch else [tokens]
        for seq in seqs:
            if not _is_ids(seq):
                if batch:
                    raise BadRequest("Invalid input: Sublist in 'tokens' must contain only "
                                     f"integers. Found: {seq}", "tokens")
                raise BadRequest("Invalid input: 'tokens' must be a list of integers.", "tokens")
        vocab = self.tm.ready.vocab_size if self.tm.ready is not None else 0
        for seq in seqs:
            bad = [t for t in seq if t < 0 or (vocab and t >= vocab)]
            if bad:
                raise BadRequest(f"Error decoding tokens: token id {bad[0]} is out of the "
                                 f"vocabulary (size {vocab}). Input tokens might be invalid for "
                                 "the model.", "tokens")

        def decode() -> list[str]:
            tok = self.worker.tokenizer()
            return [tok.decode(s, skip_special_tokens=req.skip_special_tokens) if s else ""
                    for s in seqs]

        texts = await self.worker.run(decode)
        return json_response({"text": texts if batch else texts[0]})


def register_tokenize_routes(app, tm, args, chat_template) -> None:
    """`chat_template`: the chat route's ChatTemplate, so messages tokenize as chat renders them."""
    worker = TokenizerThread(tm.tokenizer)
    tokenize, detokenize = TokenizeServing(tm, args, chat_template, worker), DetokenizeServing(tm, args, worker)
    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenize", tokenize.handle, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize.handle, methods=["POST"])
