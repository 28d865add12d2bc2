"""Wire shapes of the OpenAI-compatible /v1 API: request models (OpenAI's field set plus SGLang's
extras) and the response pieces built from native /generate outputs (finish reasons, usage, the two
logprob formats, the error envelope).

Responses are plain dicts so they serialize with orjson like the native API. A request model's
top-level fields, declared or not (an SDK's `extra_body` lands there), pass request_fields.py's
policy for that model: a field nl does not honour is a 400 naming it unless null or neutral (e.g.
`best_of: 1`, `store: false`). Nested parts (messages, response_format) ignore unknown keys: SDKs
replay returned messages with null extras. Range checks live in SamplingParams, so /v1 and
/generate reject the same values with the same messages; types are strict on both ("8" is not a
number, 1 is not a boolean; 8.0 is the integer 8).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from nlcli.engine.api.http_utils import loads_body
from nlcli.engine.api.request_fields import OPENAI_POLICIES, FieldPolicy
from nlcli.engine.sampling.params import MAX_N

# Cap on /v1 `logprobs` / `top_logprobs` (OpenAI's own limits are 5 and 20).
MAX_TOP_LOGPROBS = 20

Prompt = Union[str, list[str], list[int], list[list[int]]]


def _integral(v: Any) -> Any:
    # JSON has one number type: 8.0 is the integer 8, as on /generate (8.5, "8" and true are not).
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]


class _Lenient(BaseModel):
    """A nested part of a request: unknown keys are dropped, known ones are typed strictly."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class RequestModel(BaseModel):
    """A whole /v1 request: unknown keys are kept (in `model_extra`) so the policy can refuse them."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), strict=True)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingExtras(RequestModel):
    """Fields shared by completions and chat: OpenAI's sampling knobs and SGLang's extras."""

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Int = 1
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[Int] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # SGLang extras
    top_k: Optional[Int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Int = 0
    stop_token_ids: Optional[list[Int]] = None
    stop_regex: Optional[Union[str, list[str]]] = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    lora_path: Optional[Any] = None
    rid: Optional[str] = None
    custom_logit_processor: Optional[str] = None  # needs --enable-custom-logit-processor
    custom_params: Optional[dict[str, Any]] = None


class CompletionRequest(_SamplingExtras):
    prompt: Prompt
    max_tokens: Optional[Int] = 16
    echo: bool = False
    logprobs: Optional[Int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[Int] = None
    suffix: Optional[str] = None
    json_schema: Optional[str] = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Any = None


Content = Union[str, list[Union[TextPart, ImagePart]], None]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class JsonSchemaFormat(_Lenient):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ChatCompletionRequest(_SamplingExtras):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Any] = None
    continue_final_message: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class EmbeddingRequest(RequestModel):
    model: str
    input: Prompt
    encoding_format: Optional[Literal["float", "base64"]] = None
    dimensions: Optional[Int] = None
    user: Optional[str] = None


# ---- request -> native pieces ----------------------------------------------------------------
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "stop", "stop_token_ids", "stop_regex", "regex", "ebnf", "seed",
                  "logit_bias", "custom_params")
_SAMPLING_FLAGS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


class BadRequest(ValueError):
    """A 400 whose `param` names the offending field."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def parse_request(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = loads_body(raw)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        where = lambda err: ".".join(str(x) for x in err["loc"]) or "body"  # noqa: E731
        text = "; ".join(f"{where(err)}: {err['msg']}" for err in errs[:3])
        raise BadRequest(f"Invalid request: {text}", where(errs[0]) if errs else None) from None
    # A RequestModel keeps unknown keys for its policy to judge; any other model forbids them
    # (extra="forbid", a 400 above), so nothing a client sends is silently ignored.
    found = field_policy(model).problem(sent_fields(req)) if issubclass(model, RequestModel) else None
    if found is not None:
        raise BadRequest(found[1], found[0])
    return req


def field_policy(model: type[BaseModel]) -> FieldPolicy:
    """The model's policy, its defaults filled in from the declared fields on first use."""
    policy = OPENAI_POLICIES[model.__name__]  # a request model without a policy is a bug
    if not policy.defaults:
        policy.defaults = {n: f.default for n, f in model.model_fields.items()
                           if not f.is_required()}
    return policy


def sent_fields(req: BaseModel) -> dict[str, Any]:
    """The top-level fields the client sent: declared ones it set, and every unknown one."""
    fields = {name: getattr(req, name) for name in req.model_fields_set}
    fields.update(req.model_extra or {})
    return fields


def sampling_dict(req: Any, max_tokens: Optional[int]) -> dict:
    if max_tokens is not None and max_tokens < 0:
        raise BadRequest(f"max_tokens must be at least 0, got {max_tokens}.", "max_tokens")
    if req.min_tokens < 0 or (max_tokens is not None and req.min_tokens > max_tokens):
        raise BadRequest(f"min_tokens must be in [0, max_tokens], got {req.min_tokens}.", "min_tokens")
    if not 1 <= req.n <= MAX_N:  # before anything is expanded
        raise BadRequest(f"n must be in [1, {MAX_N}], got {req.n}.", "n")
    sp: dict = {"max_new_tokens": max_tokens, "min_new_tokens": req.min_tokens, "n": req.n}
    for key in _SAMPLING_KEYS:
        if getattr(req, key) is not None:
            sp[key] = getattr(req, key)
    for key in _SAMPLING_FLAGS:
        sp[key] = getattr(req, key)
    return sp


def normalize_prompt(prompt: Any, field: str) -> list:
    """A list of prompts: strings, or token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt or (isinstance(prompt[0], list) and not all(prompt)):
        raise BadRequest(f"{field} must not be empty.", field)
    if isinstance(prompt[0], int):
        prompt = [prompt]
    return prompt


# ---- response pieces -------------------------------------------------------------------------
def error_body(message: str, status: int = 400, type_: str = "BadRequestError",
               param: Optional[str] = None) -> dict:
    """SGLang's flat OpenAI error; the SDK picks its exception class from the HTTP status."""
    return {"object": "error", "message": message, "type": type_, "param": param, "code": status}


def finish_reason(fr: Optional[dict]) -> Optional[str]:
    return None if fr is None else fr.get("type")


def matched_stop(fr: Optional[dict]) -> Union[int, str, None]:
    return fr.get("matched") if fr and fr.get("type") == "stop" else None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int]) -> dict:
    """`cached_tokens` None (no --enable-cache-report) leaves prompt_tokens_details null."""
    details = None if cached_tokens is None else {"cached_tokens": cached_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": details}


Triple = list  # [logprob | None, token_id, text | None], the native logprob entry
TokenText = Callable[[Triple], str]


def _pad(tops: Optional[list], n: int) -> list:
    tops = list(tops or [])
    return tops + [None] * (n - len(tops))


def legacy_logprobs(entries: list[Triple], tops: Optional[list], k: int, to_text: TokenText,
                    offset0: int = 0) -> dict:
    """Completions-style logprobs: parallel lists, top alternatives as {token_text: logprob}."""
    tokens = [to_text(e) for e in entries]
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top_dicts = [None if (k <= 0 or top is None) else {to_text(x): x[0] for x in top}
                 for top in _pad(tops, len(entries))]
    return {"tokens": tokens, "token_logprobs": [e[0] for e in entries],
            "top_logprobs": top_dicts, "text_offset": offsets}


def _chat_token(entry: Triple, to_text: TokenText) -> dict:
    text = to_text(entry)
    return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": entry[0]}


def chat_logprobs(entries: list[Triple], tops: Optional[list], k: int, to_text: TokenText) -> dict:
    content = []
    for entry, top in zip(entries, _pad(tops, len(entries))):
        item = _chat_token(entry, to_text)
        item["top_logprobs"] = [_chat_token(x, to_text) for x in (top or [])[:k]] if k > 0 else []
        content.append(item)
    return {"content": content}
