"""The API process's side of embedding and reward models: /encode, /classify and /judge.

Validates the body (`text` or `input_ids`, single or list, `rid`), tokenizes the way
sentence-transformers does for the served checkpoint (special tokens added; lowercased when it
says `do_lower_case`; truncated to its `max_seq_length`, else over-long inputs are a 400), sends
each input to the engine as a zero-token generate request, and answers with the engine's pooled
vector or the reward head's scores: `{"embedding": [...], "meta_info": {"id", "prompt_tokens"}}`,
a list for a list. Requests live in the TokenizerManager's table like generations do, so engine
death, client disconnects and weight updates see them too.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import Response

from nlcli.engine.api.http_utils import finals_or_disconnect, json_response, native_error, read_json
from nlcli.engine.api.native_input import is_int_list, request_rids
from nlcli.engine.api.prepare import INLINE_TEXT_CHARS, check_vocab
from nlcli.engine.api.req_state import EngineDeadError, ReqState
from nlcli.engine.api.request_fields import ENCODE
from nlcli.engine.api.token_only import TEXT_PROMPT
from nlcli.engine.io_struct import BatchEmbeddingOut, TokenizedGenerateReqInput
from nlcli.engine.limits import check_input_len
from nlcli.engine.sampling.params import SamplingParams

logger = logging.getLogger("nlcli.embedding")

NOT_EMBEDDING_MESSAGE = (
    "This model does not appear to be an embedding model by default. Please add `--is-embedding` "
    "when launching the server or try another model.")
NOT_GENERATION_MESSAGE = (
    "This server runs an embedding or reward model (--is-embedding), which cannot generate text. "
    "Use /encode or /classify, or launch the server without --is-embedding.")
NO_INPUT_MESSAGE = "Either text or input_ids should be provided."
_FINISH = {"type": "length", "length": 0}


@dataclass
class EmbedItem:
    text: Optional[str]
    input_ids: Optional[list[int]]
    rid: str
    token_type_ids: Optional[list[int]] = None  # a cross-encoder pair's segments (/v1/rerank)


def parse_encode(body: Any) -> tuple[list[EmbedItem], bool]:
    """Normalize an /encode body into (items, is_batch); ValueError with the field's problem."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    ENCODE.check(body)  # a field nl would ignore is a 400 naming it
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ValueError(NO_INPUT_MESSAGE)
    if text is not None:
        if isinstance(text, str):
            prompts, is_batch = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, is_batch = list(text), True
        else:
            raise ValueError("text must be a string or a non-empty list of strings.")
    else:
        if is_int_list(ids) and ids:
            prompts, is_batch = [ids], False
        elif isinstance(ids, list) and ids and all(is_int_list(x) and x for x in ids):
            prompts, is_batch = list(ids), True
        else:
            raise ValueError("input_ids must be a non-empty list of integers or a list of such lists.")
    rids = request_rids(body.get("rid"), len(prompts), is_batch, "inputs")
    return embed_items(prompts, rids), is_batch


def embed_items(prompts: list[Union[str, list[int]]], rids: Optional[list[Optional[str]]] = None
                ) -> list[EmbedItem]:
    """One EmbedItem per prompt (a text, or token ids); a fresh rid where none is given."""
    rids = rids or [None] * len(prompts)
    items = []
    for p, r in zip(prompts, rids):
        if p == "" or p == []:
            raise ValueError("text must not be empty." if p == "" else "input_ids must not be empty.")
        text, ids = (p, None) if isinstance(p, str) else (None, list(p))
        items.append(EmbedItem(text, ids, r or uuid.uuid4().hex))
    if len({it.rid for it in items}) != len(items):
        raise ValueError("Duplicate request ID detected within the request; rid entries must be "
                         "distinct.")
    return items


class EncodeRejected(Exception):
    """The engine ended an embedding request with an error (`status`: its HTTP status)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


class EmbeddingState(ReqState):
    """An embedding request: no text to detokenize (an engine-side abort still passes through
    the TokenizerManager as a token delta, with empty text)."""

    def __init__(self, rid: str, prompt_len: int):
        super().__init__(rid, prompt_len, None, False)


class EmbeddingManager:
    def __init__(self, tm, args):
        self.tm = tm
        self.args = args
        self._config = None
        tm.on_message(BatchEmbeddingOut, self.on_output)

    @property
    def serves_embeddings(self) -> bool:
        ready = self.tm.ready
        return ready is not None and not ready.is_generation

    # ---- tokenization ----------------------------------------------------------------------
    def embedding_config(self):
        """The checkpoint's sentence-transformers tokenization settings (read once)."""
        if self._config is None:
            from nlcli.engine.configs.embedding_config import EmbeddingConfig, read_embedding_config
            from nlcli.engine.configs.model_source import resolve_model_source

            try:
                src = resolve_model_source(self.args.model_path, True, self.args.revision,
                                           self.args.download_dir)
                self._config = read_embedding_config(src.local_dir)
            except Exception as e:  # the engine loaded it, so only the extras can be missing
                logger.warning("No sentence-transformers settings for %s: %s", self.args.model_path, e)
                self._config = EmbeddingConfig("cls", True)
        return self._config

    def tokenize(self, text: str) -> list[int]:
        if self.tm.tokenizer is None:  # --skip-tokenizer-init
            raise ValueError(TEXT_PROMPT)
        cfg = self.embedding_config()
        if cfg.do_lower_case:
            text = text.lower()
        if cfg.max_seq_length:
            # sentence-transformers truncates to max_seq_length, special tokens included.
            return list(self.tm.tokenizer(text, truncation=True, max_length=cfg.max_seq_length)["input_ids"])
        return list(self.tm.tokenizer(text)["input_ids"])

    def _prepare(self, item: EmbedItem) -> tuple[TokenizedGenerateReqInput, EmbeddingState]:
        if item.input_ids is not None:
            ids = item.input_ids
            check_vocab(ids, self.tm.ready.vocab_size)
        else:
            ids = self.tokenize(item.text)
        n = len(ids)
        check_input_len(n, self.tm.context_len, self.tm.pool_size)
        msg = TokenizedGenerateReqInput(item.rid, list(ids), SamplingParams(max_new_tokens=0),
                                        token_type_ids=item.token_type_ids)
        return msg, EmbeddingState(item.rid, n)

    async def submit(self, items: list[EmbedItem]) -> list[EmbeddingState]:
        """Validate and tokenize every item (a bad one rejects the whole batch), then send; big
        texts are tokenized off the event loop."""
        self.tm.check_accepting()  # a dead engine is a 503 before any input is looked at

        def run():
            return [self._prepare(it) for it in items]

        heavy = sum(len(it.text) for it in items if it.text is not None) > INLINE_TEXT_CHARS
        return self.tm.submit_tokenized(await asyncio.to_thread(run) if heavy else run())

    # ---- engine outputs --------------------------------------------------------------------
    def on_output(self, msg: BatchEmbeddingOut) -> None:
        for rid, vec, n in zip(msg.rids, msg.embeddings, msg.prompt_tokens):
            st = self.tm.pending(rid)
            if st is None:
                continue
            if isinstance(st, EmbeddingState):
                out = {"embedding": vec, "meta_info": {"id": rid, "finish_reason": _FINISH,
                                                       "prompt_tokens": n}}
            else:
                # A generate request reached an embedding engine (the /health_generate probe,
                # /v1/completions): it ran, but there is no text to give back.
                out = {"text": "", "meta_info": {
                    "id": rid, "finish_reason": {"type": "abort", "status_code": 400,
                                                 "message": NOT_GENERATION_MESSAGE},
                    "prompt_tokens": n, "completion_tokens": 0, "cached_tokens": 0}}
            st.finish(out)

    # ---- the encode path (the native routes and /v1/embeddings) ------------------------------
    async def encode(self, items: list[EmbedItem], request: Request) -> Optional[list[dict]]:
        """`{"embedding", "meta_info": {"id", "prompt_tokens"}}` per item, in order; None when the
        client went away (all aborted). ValueError: a bad input (400); EngineDeadError (503);
        EncodeRejected: the engine refused or failed a request."""
        if not self.serves_embeddings:
            raise ValueError(NOT_EMBEDDING_MESSAGE)
        states = await self.submit(items)
        outs = await finals_or_disconnect(self.tm, states, request, self.tm.next_output)
        if outs is None:
            return None
        for out in outs:
            if "embedding" not in out:  # aborted in the engine
                reason = out["meta_info"]["finish_reason"] or {}
                raise EncodeRejected(reason.get("message", "The request was aborted."),
                                     reason.get("status_code", 500))
        return [{"embedding": o["embedding"],
                 "meta_info": {"id": o["meta_info"]["id"],
                               "prompt_tokens": o["meta_info"]["prompt_tokens"]}} for o in outs]

    async def handle(self, request: Request) -> Response:
        if not self.serves_embeddings:
            return native_error(NOT_EMBEDDING_MESSAGE)
        try:
            items, is_batch = parse_encode(await read_json(request))
            shaped = await self.encode(items, request)
        except ValueError as e:
            return native_error(str(e))
        except EngineDeadError as e:
            return native_error(str(e), 503)
        except EncodeRejected as e:
            return native_error(e.message, e.status)
        if shaped is None:
            return Response(status_code=499)
        return json_response(shaped if is_batch else shaped[0])


def register_embedding_routes(app, tm, args) -> EmbeddingManager:
    """/encode, /classify and the older /judge (POST or PUT), all answered alike."""
    manager = EmbeddingManager(tm, args)
    for path in ("/encode", "/classify", "/judge"):
        app.add_api_route(path, manager.handle, methods=["POST", "PUT"])
    return manager
