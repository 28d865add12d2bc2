"""Wire-value coercion for sampling_params: each field's JSON value checked and converted to the
type SamplingParams holds, with the 400 message the client gets for a wrong one (JSON has one
number type: 5.0 is the integer 5; ints stay ints so messages echo the client's own value).
"""

from __future__ import annotations

import math
import struct
from typing import Any

_INT = {"max_new_tokens", "min_new_tokens", "top_k", "n", "seed"}
_FLOAT = {
    "temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
}
_BOOL = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_STR = {"regex", "ebnf"}


FLOAT32_MAX = 3.4028234663852886e38


def as_float32(v: float) -> float:
    """`v` rounded to float32 as the sampler's tensors hold it (inf past FLOAT32_MAX)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # an int too large for any float
        return math.copysign(math.inf, v)


def show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _as_int(name: str, v: Any) -> int:
    # JSON has one number type; 5.0 is the integer 5, 5.5 and true are not.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be an integer, got {show(v)}.")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ValueError(f"{name} must be an integer, got {show(v)}.")
        v = int(v)
    return v


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {show(v)}.")
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {v}.")
    return v  # ints kept as given so messages echo the client's own value


def coerce(name: str, v: Any) -> Any:
    if v is None:
        return None  # only max_new_tokens keeps an explicit null (unlimited)
    if name in _INT:
        return _as_int(name, v)
    if name in _FLOAT:
        return _as_float(name, v)
    if name in _BOOL:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a boolean, got {show(v)}.")
        return v
    if name in _STR:
        if not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {show(v)}.")
        return v
    if name == "json_schema":
        if not isinstance(v, str):
            raise ValueError("json_schema must be a JSON string, not an object.")
        return v
    if name == "stop":
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop must be a string or a list of strings, got {show(v)}.")
        return list(items)
    if name == "stop_regex":
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop_regex must be a string or a list of strings, got {show(v)}.")
        return list(items)
    if name == "stop_token_ids":
        if not isinstance(v, list):
            raise ValueError(f"stop_token_ids must be a list of integers, got {show(v)}.")
        return [_as_int("stop_token_ids", t) for t in v]
    if name == "custom_params":
        if not isinstance(v, dict):
            raise ValueError(f"custom_params must be an object, got {show(v)}.")
        return v
    if name == "logit_bias":
        if not isinstance(v, dict):
            raise ValueError(f"logit_bias must be an object, got {show(v)}.")
        out: dict[int, float] = {}
        for k, b in v.items():
            try:
                tid = int(k)  # JSON object keys arrive as strings
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys must be token ids, got {show(k)}.") from None
            out[tid] = float(_as_float("logit_bias", b))
        return out
    return v
