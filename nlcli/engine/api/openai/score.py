"""/v1/score: SGLang's scoring API for generation models. How likely is each label token right
after query+item (or item+query with `item_first`)?

Each item becomes one native request over `query + item` (string concatenation for text, list
concatenation for token ids) with max_new_tokens 0, return_logprob and the labels as
`token_ids_logprob`; its single `output_token_ids_logprobs` entry is the next-token distribution
after the whole sequence. A score is exp(logprob) per label, in label order, or with
`apply_softmax` a softmax over the labels' logprobs only (divided by `temperature`). Validation
messages are SGLang's. Not supported (400): sequence-classification scoring, setwise
`score_extraction_token`, pooled hidden states and embedding overrides.
"""

from __future__ import annotations

import math
import uuid
from typing import Optional, Union

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.native_input import LogprobArgs, gen_items
from nlcli.engine.api.openai.protocol import BadRequest, parse_request
from nlcli.engine.api.openai.serving import OpenAIServing


class ScoringRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    query: Optional[Union[str, list[int]]] = None
    items: Optional[Union[str, list[str], list[list[int]]]] = None
    label_token_ids: Optional[Union[list[int], list[list[int]]]] = None
    apply_softmax: bool = False
    temperature: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    return_token_logprobs: bool = False
    item_first: bool = False
    model: str = "default"
    # SGLang fields nl does not serve: a 400 when set, never silently dropped.
    return_pooled_hidden_states: bool = False
    score_extraction_token: Optional[str] = None
    embed_override_token_id: Optional[int] = None
    query_embed_overrides: Optional[list] = None
    item_embed_overrides: Optional[list] = None


_UNSUPPORTED = {
    "return_pooled_hidden_states": "return_pooled_hidden_states is only supported for "
                                   "non-generation models",
    "score_extraction_token": "score_extraction_token (setwise scoring) is not supported by nl",
    "embed_override_token_id": "embedding overrides are not supported by nl",
    "query_embed_overrides": "embedding overrides are not supported by nl",
    "item_embed_overrides": "embedding overrides are not supported by nl",
}


class ScoreServing(OpenAIServing):
    # Token-id queries and items need no tokenizer; text ones are refused by the native path.
    needs_tokenizer = False

    async def serve(self, request: Request):
        req: ScoringRequest = parse_request(await request.body(), ScoringRequest)
        for name, message in _UNSUPPORTED.items():
            if getattr(req, name) not in (None, False):
                raise BadRequest(message, name)
        if self.tm.ready is not None and not self.tm.ready.is_generation:
            raise BadRequest("/v1/score serves generation (CausalLM) models only in nl; "
                             "sequence-classification scoring is not supported.")
        if req.temperature != 1.0 and not req.apply_softmax:
            raise BadRequest("temperature requires apply_softmax=True", "temperature")
        if req.label_token_ids is None:
            raise BadRequest("label_token_ids is required for generation (CausalLM) models.",
                             "label_token_ids")
        if req.items is None:
            raise BadRequest("items must be provided", "items")
        if not req.items:
            return self._answer(req, [], [], 0)
        prompts = sequences(req.query, req.items, req.item_first)
        labels = label_lists(req.label_token_ids, len(prompts),
                             self.tm.ready.vocab_size if self.tm.ready else 0)
        items = []
        for prompt, ids in zip(prompts, labels):
            lp = LogprobArgs(return_logprob=True, logprob_start_len=-1, token_ids_logprob=ids)
            items += gen_items([prompt], {"max_new_tokens": 0}, [uuid.uuid4().hex], lp)
        outs = await self._finals(await self.tm.submit(items, stream=False), request)
        if outs is None:
            return Response(status_code=499)
        rows = [label_logprobs(o["meta_info"], ids) for o, ids in zip(outs, labels)]
        prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        return self._answer(req, [to_scores(r, req.apply_softmax, req.temperature) for r in rows],
                            rows, prompt_tokens)

    def _answer(self, req: ScoringRequest, scores: list, rows: list, prompt_tokens: int):
        return json_response({
            "scores": scores, "pooled_hidden_states": None,
            "token_logprobs": rows if req.return_token_logprobs else None,
            "model": req.model, "object": "scoring",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None,
                      "reasoning_tokens": 0, "completion_tokens_details": None}})


def sequences(query, items, item_first: bool) -> list:
    """One prompt per item: text + text, or ids + ids (SGLang accepts no other mix)."""
    if query is None:  # an omitted query is empty of the items' kind
        query = [] if isinstance(items, list) and isinstance(items[0], list) else ""
    if isinstance(query, str) and isinstance(items, (str, list)) and (
            isinstance(items, str) or all(isinstance(i, str) for i in items)):
        texts = [items] if isinstance(items, str) else items
        return [i + query if item_first else query + i for i in texts]
    if isinstance(query, list) and isinstance(items, list) and all(isinstance(i, list) for i in items):
        return [i + query if item_first else query + i for i in items]
    raise BadRequest("Invalid combination of query/items types for score_request.", "items")


def label_lists(labels: list, num_items: int, vocab_size: int) -> list[list[int]]:
    """One validated candidate list per item, with SGLang's messages."""
    if not isinstance(labels, list) or not labels:
        raise BadRequest("label_token_ids must be a nonempty list", "label_token_ids")
    if isinstance(labels[0], list):
        if len(labels) != num_items:
            raise BadRequest("label_token_ids must have one list per item", "label_token_ids")
        lists = labels
    else:
        lists = [labels] * num_items
    for one in lists:
        if not isinstance(one, list) or not one:
            raise BadRequest("each item must have a nonempty candidate list", "label_token_ids")
        if any(type(t) is not int or t < 0 for t in one):
            raise BadRequest("label_token_ids must contain nonnegative integers", "label_token_ids")
        if len(set(one)) != len(one):
            raise BadRequest("label_token_ids must not contain duplicate tokens", "label_token_ids")
        for t in one:
            if vocab_size and t >= vocab_size:
                raise BadRequest(f"Token ID {t} is out of vocabulary (vocab size: {vocab_size})",
                                 "label_token_ids")
    return [list(one) for one in lists]


def label_logprobs(meta: dict, labels: list[int]) -> list[float]:
    """The labels' logprobs at the position after the sequence, in label order."""
    entries = meta.get("output_token_ids_logprobs") or []
    if not entries or not entries[0]:
        raise RuntimeError(f"output_token_ids_logprobs is empty for request {meta.get('id')}.")
    found = {int(e[1]): e[0] for e in entries[0]}
    return [found.get(t, float("-inf")) for t in labels]


def to_scores(logprobs: list[float], apply_softmax: bool, temperature: float) -> list[float]:
    if not apply_softmax:
        return [math.exp(x) if x != float("-inf") else 0.0 for x in logprobs]
    top = max(logprobs)  # centred first, so a small temperature cannot overflow
    weights = [math.exp((x - top) / temperature) for x in logprobs]
    total = sum(weights)
    return [w / total for w in weights]
