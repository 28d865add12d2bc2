"""Request limits both processes enforce with the same words: the API process rejects with a 400
before anything is sent, and the engine applies the same check as its guard for direct callers.
The bounds on one request's work (generations, JSON nesting, free-form field sizes, text length
before tokenizing) keep one client from stalling or wedging the server for the others."""

from __future__ import annotations

from typing import Any

import orjson


def check_input_len(num_tokens: int, context_len: int, pool_size: int) -> None:
    """ValueError when a prompt of `num_tokens` leaves no room for one generated token."""
    if num_tokens >= context_len:
        raise ValueError(f"The input ({num_tokens} tokens) is longer than the model's context "
                         f"length ({context_len} tokens).")
    if num_tokens >= pool_size:
        raise ValueError(f"The input ({num_tokens} tokens) is longer than the KV cache pool "
                         f"({pool_size} tokens).")


# Engine requests one HTTP request may ask for (prompts x n): n alone is capped at MAX_N (64).
MAX_GENERATIONS_PER_REQUEST = 256


def check_generations(num_prompts: int, n: int) -> None:
    """ValueError when one request asks for more engine requests than MAX_GENERATIONS_PER_REQUEST."""
    if num_prompts * n > MAX_GENERATIONS_PER_REQUEST:
        raise ValueError(f"The request asks for {num_prompts * n} generations ({num_prompts} "
                         f"prompt(s) x n={n}); at most {MAX_GENERATIONS_PER_REQUEST} are allowed "
                         "per request.")


# JSON nesting allowed in a request body (free-form fields such as custom_params, a JSON schema or
# chat_template_kwargs included): deeper bodies cannot be pickled to the engine and serve no one.
MAX_JSON_DEPTH = 32
# Serialized size of one free-form sampling field; it is copied into every engine request.
MAX_FREE_FORM_BYTES = 256 * 1024
FREE_FORM_FIELDS = ("custom_params", "logit_bias", "json_schema", "regex", "ebnf")


def check_json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """ValueError naming the field (its first three levels) when `obj` nests deeper than `limit`."""
    stack: list[tuple[Any, int, str]] = [(obj, 0, "")] if isinstance(obj, (dict, list)) else []
    while stack:
        value, depth, where = stack.pop()
        children = value.items() if isinstance(value, dict) else enumerate(value)
        if depth >= limit:
            raise ValueError(f"{where or 'The request body'} is nested more than {limit} levels "
                             "deep.")
        for key, child in children:
            if isinstance(child, (dict, list)):
                name = where if depth >= 3 else (f"{where}.{key}" if where else str(key))
                stack.append((child, depth + 1, name))


def check_free_form(sampling: dict) -> None:
    """ValueError naming the field when a free-form sampling field is larger than allowed."""
    for key in FREE_FORM_FIELDS:
        value = sampling.get(key)
        if value is None:
            continue
        size = len(value) if isinstance(value, str) else len(orjson.dumps(value))
        if size > MAX_FREE_FORM_BYTES:
            raise ValueError(f"sampling_params.{key} is {size} bytes; at most "
                             f"{MAX_FREE_FORM_BYTES} are allowed.")


def check_text_len(num_chars: int, context_len: int, max_chars_per_token: int) -> None:
    """ValueError for a text too long for the context whatever it tokenizes to: no token of the
    vocabulary covers more than `max_chars_per_token` characters, so this needs no tokenizing."""
    if context_len and num_chars > context_len * max_chars_per_token:
        raise ValueError(f"The input ({num_chars} characters) is longer than the model's context "
                         f"length ({context_len} tokens) can hold.")
