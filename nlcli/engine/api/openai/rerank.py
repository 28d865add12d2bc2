"""/v1/rerank for cross-encoder rerankers (an embedding server on a `*ForSequenceClassification`
BERT / XLM-R checkpoint), as SGLang serves it: each (query, document) pair is tokenized as the
model's tokenizer pairs them (segment ids included), scored by the engine in one batch, and the
answer is a bare JSON array of {score, document, index, meta_info}, highest score first, cut to
`top_n`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Optional

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, field_validator

from nlcli.engine.api.encode import EmbedItem
from nlcli.engine.api.http_utils import finals_or_disconnect, json_response
from nlcli.engine.api.openai.protocol import BadRequest, parse_request
from nlcli.engine.api.openai.serving import OpenAIServing
from nlcli.engine.api.prepare import INLINE_TEXT_CHARS


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    query: str
    documents: list[str]
    top_n: Optional[int] = None
    return_documents: bool = True
    model: Optional[str] = None

    @field_validator("top_n")
    @classmethod
    def _positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("parameter top_n should be larger than 0.")
        return v


def _check(req: RerankRequest) -> None:
    if not req.query:
        raise BadRequest("Query cannot be empty", "query")
    if not req.query.strip():
        raise BadRequest("Query cannot be empty or whitespace only", "query")
    if not req.documents:
        raise BadRequest("Documents cannot be empty", "documents")
    for doc in req.documents:
        if not doc:
            raise BadRequest("Each document must be a non-empty string", "documents")
        if not doc.strip():
            raise BadRequest("Each document cannot be empty or whitespace only", "documents")


class RerankServing(OpenAIServing):
    def __init__(self, tm, args, embeddings):
        super().__init__(tm, args)
        self.embeddings = embeddings  # the /encode manager: submits and answers pooled requests

    def _pair(self, query: str, doc: str) -> tuple[list[int], list[int]]:
        enc = self.tm.tokenizer(query, doc, truncation=True, max_length=self.tm.context_len - 1)
        ids = list(enc["input_ids"])
        return ids, list(enc.get("token_type_ids") or [0] * len(ids))

    async def serve(self, request: Request):
        req: RerankRequest = parse_request(await request.body(), RerankRequest)
        _check(req)
        if not self.embeddings.serves_embeddings:
            raise BadRequest("/v1/rerank needs a cross-encoder served with --is-embedding "
                             "(a *ForSequenceClassification checkpoint).")
        def pairs() -> list[EmbedItem]:
            items = []
            for doc in req.documents:
                ids, types = self._pair(req.query, doc)
                items.append(EmbedItem(None, ids, f"rerank-{uuid.uuid4().hex}", types))
            return items

        # Tokenizing many or long documents runs off the event loop.
        big = len(req.query) * len(req.documents) + sum(map(len, req.documents)) > INLINE_TEXT_CHARS
        items = await asyncio.to_thread(pairs) if big else pairs()
        states = await self.embeddings.submit(items)
        outs = await finals_or_disconnect(self.tm, states, request, self.tm.next_output)
        if outs is None:
            return Response(status_code=499)
        results = []
        for i, out in enumerate(outs):
            if "embedding" not in out:  # aborted in the engine
                reason = out["meta_info"]["finish_reason"] or {}
                raise BadRequest(reason.get("message", "The request was aborted."))
            entry = {"score": float(out["embedding"][0]), "index": i,
                     "meta_info": {"id": out["meta_info"]["id"],
                                   "prompt_tokens": out["meta_info"]["prompt_tokens"]}}
            if req.return_documents:
                entry["document"] = req.documents[i]
            results.append(entry)
        results.sort(key=lambda e: e["score"], reverse=True)
        return json_response(results[: req.top_n] if req.top_n else results)


def register_rerank_routes(app, tm, args, embeddings) -> None:
    app.add_api_route("/v1/rerank", RerankServing(tm, args, embeddings).handle, methods=["POST", "PUT"])
