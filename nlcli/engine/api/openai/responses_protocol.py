"""Wire shapes of /v1/responses (OpenAI's Responses API as SGLang serves it): the request model,
input items to chat messages, the response object and its message item, the nested error
envelope, and the bounded in-memory store that `previous_response_id` and GET read.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from nlcli.engine.api.http_utils import json_response
from nlcli.engine.api.openai.protocol import BadRequest

MAX_STORED_RESPONSES = 1000  # least recently used ones are dropped beyond this


class ResponsesRequest(BaseModel):
    # Fields nl does not honour (tools, reasoning, background, ...) are refused, not ignored.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    input: Union[str, list[dict[str, Any]]]
    model: Optional[str] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    tools: list[dict[str, Any]] = []
    tool_choice: Literal["auto", "none"] = "auto"
    parallel_tool_calls: bool = True
    truncation: Literal["disabled"] = "disabled"
    # SGLang's extras
    request_id: Optional[str] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty", "stop")


def sampling_params(req: ResponsesRequest) -> dict:
    if req.tools:
        raise BadRequest("tools are not supported by this server's /v1/responses.", "tools")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise BadRequest(f"max_output_tokens must be at least 1, got {req.max_output_tokens}.",
                         "max_output_tokens")
    sp: dict = {"max_new_tokens": req.max_output_tokens}
    sp.update({k: getattr(req, k) for k in _SAMPLING if getattr(req, k) is not None})
    return sp


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of text parts.", "input")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise BadRequest(f"Unsupported content part type in {where}: {kind!r} (only text).",
                             "input")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(inp: Union[str, list[dict]]) -> list[dict]:
    """The request's `input` as chat messages ({role, content})."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out = []
    for i, item in enumerate(inp):
        kind = item.get("type", "message")
        if kind not in ("message", None):
            raise BadRequest(f"Unsupported Responses API input item type: {kind}", "input")
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(f"input[{i}].role must be user, assistant, system or developer.", "input")
        out.append({"role": role, "content": _text_of(item.get("content"), f"input[{i}]")})
    if not out:
        raise BadRequest("input must not be empty.", "input")
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [] if status == "in_progress" else [output_text(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "phase": "final_answer", "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def status_of(finish: Optional[dict]) -> str:
    kind = (finish or {}).get("type")
    return {"length": "incomplete", "abort": "failed"}.get(kind, "completed")


def response_object(req: ResponsesRequest, rid: str, model: str, created: int, status: str,
                    output: list, meta: Optional[dict] = None) -> dict:
    usage = None
    if meta is not None:
        cached = meta.get("cached_tokens", 0)
        usage = {"input_tokens": meta["prompt_tokens"],
                 "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                 "output_tokens": meta["completion_tokens"],
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]}
    error = None
    if status == "failed":
        error = {"code": "server_error",
                 "message": ((meta or {}).get("finish_reason") or {}).get("message", "Aborted")}
    return {
        "id": rid, "object": "response", "created_at": created, "model": model,
        "status": status, "output": output, "usage": usage, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls, "tool_choice": req.tool_choice,
        "tools": [], "temperature": req.temperature, "top_p": req.top_p,
        "reasoning": {"effort": None, "summary": None}, "store": req.store,
        "text": {"format": {"type": "text"}}, "truncation": req.truncation, "user": req.user,
    }


def error(message: str, status: int = 400, type_: str = "invalid_request_error",
          param: Optional[str] = None):
    """/v1/responses' nested error envelope (SGLang's, and OpenAI's own)."""
    return json_response({"error": {"message": message, "type": type_, "param": param,
                                    "code": status}}, status)


def check_id(response_id: str):
    """None when `response_id` looks like one of ours, else the 400 SGLang answers."""
    if response_id.startswith("resp_"):
        return None
    return error(f"Invalid 'response_id': '{response_id}'. Expected an ID that begins with 'resp'.",
                 param="response_id")


def not_found(response_id: str):
    return error(f"Response with id '{response_id}' not found.", HTTPStatus.NOT_FOUND,
                 param="response_id")


class ResponseStore:
    """The last MAX_STORED_RESPONSES responses: the object, and the conversation that produced
    it (input messages, without instructions, which a follow-up does not inherit)."""

    def __init__(self, limit: int = MAX_STORED_RESPONSES):
        self.limit = limit
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, history: list[dict]) -> None:
        self._items[response["id"]] = (response, history)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Optional[tuple[dict, list[dict]]]:
        got = self._items.get(response_id)
        if got is not None:
            self._items.move_to_end(response_id)
        return got


def conversation_after(response: dict, history: list[dict]) -> list[dict]:
    """The messages a follow-up continues: the earlier input, then its assistant output."""
    texts = [part["text"] for item in response["output"] if item.get("type") == "message"
             for part in item["content"] if part.get("type") == "output_text"]
    return [*history, {"role": "assistant", "content": "".join(texts)}]


def now() -> int:
    return int(time.time())
