"""The native generation request, typed: one `GenItem` per engine request.

`parse_generate` normalizes a /generate body: single vs batch, text vs input_ids, per-prompt or
shared sampling_params, n > 1 expansion (prompt-major, rids `<rid>-<j>`, sample j seeded with
seed + j), and the top-level logprob arguments. Top-level fields nl does not honour are refused
first (request_fields.GENERATE). Every rejection is a ValueError whose text is the
400 message naming the field. Callers that already hold typed values (the OpenAI layer) build the
same items with `gen_items`, without a /generate body in between.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from nlcli.engine.api.request_fields import GENERATE
from nlcli.engine.limits import check_free_form, check_generations
from nlcli.engine.sampling.params import MAX_N, MAX_SEED


@dataclass
class GenItem:
    text: Optional[str]
    input_ids: Optional[list[int]]
    sampling: dict
    rid: str
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    custom_logit_processor: Optional[str] = None  # the serialized processor (top-level field)
    token_ids_logprob: Optional[list[int]] = None


@dataclass(frozen=True)
class LogprobArgs:
    """The top-level logprob arguments of one prompt."""

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    token_ids_logprob: Optional[list[int]] = None


def is_int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def request_rids(rid: Any, count: int, is_batch: bool, noun: str) -> list[Optional[str]]:
    """The client's `rid` as one entry per input (None where a fresh id is to be made); a batch
    needs a list of strings of the batch's length, a single input a string."""
    if is_batch:
        if rid is not None and not (isinstance(rid, list) and all(isinstance(r, str) for r in rid)):
            raise ValueError("rid must be a list of strings when the input is a batch.")
        if rid is not None and len(rid) != count:
            raise ValueError(f"rid has {len(rid)} entries but the batch has {count} {noun}.")
        return rid or [None] * count
    if rid is not None and not isinstance(rid, str):
        raise ValueError("rid must be a string.")
    return [rid]


def parse_generate(body: Any) -> tuple[list[GenItem], bool, bool]:
    """Normalize a /generate body into (items, is_batch, stream); ValueError names the field."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    GENERATE.check(body)  # a field nl would ignore (SGLang's, or a typo) is a 400 naming it
    text, ids = body.get("text"), body.get("input_ids")
    if text is None and ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        if isinstance(text, str):
            prompts, is_batch = [text], False
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            prompts, is_batch = list(text), True
        else:
            raise ValueError("text must be a string or a list of strings.")
        if is_batch and not prompts:
            raise ValueError("text must not be an empty list.")
    if ids is not None:
        if is_int_list(ids) and ids:
            id_prompts = [ids]
        elif isinstance(ids, list) and ids and all(is_int_list(x) for x in ids):
            id_prompts = list(ids)
        else:
            raise ValueError("input_ids must be a non-empty list of integers or a list of such lists.")
        if any(not x for x in id_prompts):
            raise ValueError("input_ids must not be empty.")
        if text is None:
            is_batch = not is_int_list(ids)
        elif len(prompts) != len(id_prompts):
            raise ValueError("text and input_ids must have the same number of prompts.")
        prompts = [None] * len(id_prompts)  # input_ids win over text
    else:
        id_prompts = [None] * len(prompts)
    if any(p == "" for p in prompts if p is not None):
        raise ValueError("text must not be empty.")

    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if len(sp) != len(prompts):
            raise ValueError(f"sampling_params has {len(sp)} entries but the batch has "
                             f"{len(prompts)} prompts.")
        sps = sp
    elif sp is None or isinstance(sp, dict):
        sps = [sp or {}] * len(prompts)
    else:
        raise ValueError("sampling_params must be an object or a list of objects.")
    for one in sps:
        if not isinstance(one, dict):
            raise ValueError("sampling_params must be an object or a list of objects.")
        check_free_form(one)
    # Checked before anything is expanded: n is bounded, then so is prompts x n.
    ns = {_checked_n(one.get("n", 1)) for one in sps}
    if len(ns) > 1:
        raise ValueError("sampling_params.n must be the same for every prompt of a batch.")
    n = ns.pop()
    check_generations(len(prompts), n)

    rids = request_rids(body.get("rid"), len(prompts), is_batch or n > 1, "prompts")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("stream must be a boolean.")

    lp = _logprob_args(body, len(prompts), n)
    processors = _processors(body.get("custom_logit_processor"), len(prompts))
    token_ids = _token_ids_logprob(body.get("token_ids_logprob"), len(prompts), is_batch)
    items = []
    for i, (p, ip, one, r) in enumerate(zip(prompts, id_prompts, sps, rids)):
        args = LogprobArgs(*(lp[key][i] for key in _LOGPROB_ARGS), token_ids[i])
        items += _samples(p, ip, one, r or uuid.uuid4().hex, n, args, processors[i])
    _check_distinct(items)
    return items, is_batch or n > 1, stream


def gen_items(prompts: Sequence[Union[str, list[int]]], sampling: dict, rids: Sequence[str],
              logprobs: LogprobArgs = LogprobArgs(),
              custom_logit_processor: Optional[str] = None) -> list[GenItem]:
    """One GenItem per prompt (a text, or token ids) and sample, as parse_generate makes them:
    `sampling["n"]` samples each, rids `<rid>-<j>` when n > 1, shared sampling params, logprob
    arguments and custom logit processor. ValueError for an empty prompt or a bad n."""
    n = _checked_n(sampling.get("n", 1))
    check_generations(len(prompts), n)
    check_free_form(sampling)
    items = []
    for p, rid in zip(prompts, rids):
        text, ids = (p, None) if isinstance(p, str) else (None, list(p))
        if text == "" or ids == []:
            raise ValueError("text must not be empty." if text == "" else "input_ids must not be empty.")
        items += _samples(text, ids, sampling, rid, n, logprobs,
                          _processors(custom_logit_processor, 1)[0])
    _check_distinct(items)
    return items


def _samples(text: Optional[str], ids: Optional[list[int]], sampling: dict, rid: str, n: int,
             lp: LogprobArgs, processor: Optional[str] = None) -> list[GenItem]:
    out = []
    for j in range(n):
        sub = _nth_sample(sampling, j) if n > 1 else dict(sampling)
        sub.pop("n", None)
        out.append(GenItem(text, ids, sub, rid if n == 1 else f"{rid}-{j}", lp.return_logprob,
                           lp.logprob_start_len, lp.top_logprobs_num, lp.return_text_in_logprobs,
                           custom_logit_processor=processor,
                           token_ids_logprob=lp.token_ids_logprob))
    return out


def _processors(value: Any, num_prompts: int) -> list[Optional[str]]:
    """`custom_logit_processor` as one entry per prompt: a string (or null) for all, or a list."""
    if value is None or isinstance(value, str):
        return [value] * num_prompts
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        if len(value) != num_prompts:
            raise ValueError(f"custom_logit_processor has {len(value)} entries but the batch has "
                             f"{num_prompts} prompts.")
        return list(value)
    raise ValueError("custom_logit_processor must be a string or a list of strings.")


def _check_distinct(items: list[GenItem]) -> None:
    # Outputs are routed by rid: a repeated one would leave a client waiting forever.
    seen: set[str] = set()
    dups = [it.rid for it in items if it.rid in seen or seen.add(it.rid)]
    if dups:
        raise ValueError(f"Duplicate request ID detected within the request: {dups}; rid entries "
                         f"must be distinct.")


def _checked_n(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        shown = "a larger integer" if isinstance(n, int) and n > 10**18 else repr(n)[:40]
        raise ValueError(f"sampling_params.n must be an integer in [1, {MAX_N}], got {shown}.")
    return n


def _nth_sample(sampling: dict, j: int) -> dict:
    """Sample j of a seeded n > 1 request draws with seed + j, so the n samples differ yet each
    is reproducible."""
    sub = dict(sampling)
    for key in ("seed", "sampling_seed"):
        seed = sub.get(key)
        if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED:
            sub[key] = (seed + j) % (MAX_SEED + 1)
    return sub


_LOGPROB_ARGS = {"return_logprob": (bool, False), "logprob_start_len": (int, -1),
                 "top_logprobs_num": (int, 0), "return_text_in_logprobs": (bool, False)}


def _logprob_args(body: dict, num_prompts: int, n: int) -> dict[str, list]:
    """Each top-level logprob argument as one value per prompt (a list is allowed when n == 1)."""
    out = {}
    for key, (kind, default) in _LOGPROB_ARGS.items():
        value = body.get(key)
        if value is None:
            value = default
        if isinstance(value, list) and key != "return_text_in_logprobs":
            if n > 1:
                raise ValueError(f"{key} must be a single value when n > 1.")
            if len(value) != num_prompts:
                raise ValueError(f"{key} has {len(value)} entries but the batch has "
                                 f"{num_prompts} prompts.")
            values = list(value)
        else:
            values = [value] * num_prompts
        for v in values:
            if isinstance(v, bool) != (kind is bool) or not isinstance(v, kind):
                raise ValueError(f"{key} must be {'a boolean' if kind is bool else 'an integer'}, "
                                 f"got {v!r}.")
        out[key] = values
    return out


def _token_ids_logprob(value: Any, num_prompts: int, is_batch: bool) -> list[Optional[list[int]]]:
    """SGLang's `token_ids_logprob` as one id list (or None) per prompt: a flat list of ints is
    shared by every prompt; a list of lists has one list per prompt of a batch."""
    if value is None or value == []:
        return [None] * num_prompts
    if is_int_list(value):
        return [list(value)] * num_prompts
    if isinstance(value, list) and all(is_int_list(x) for x in value):
        if not is_batch and len(value) == 1:
            return [list(value[0]) or None]
        if not is_batch:
            raise ValueError("token_ids_logprob must be a flat list of integers for a single "
                             "prompt.")
        if len(value) != num_prompts:
            raise ValueError(f"token_ids_logprob has {len(value)} lists but the batch has "
                             f"{num_prompts} prompts.")
        return [list(x) or None for x in value]
    raise ValueError("token_ids_logprob must be a list of integers, or one such list per prompt "
                     "of a batch.")
