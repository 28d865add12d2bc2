"""Logprob fields of a /generate answer: `[logprob, token_id, text]` triples and top-k lists.

Everything here works on raw logits (the model's distribution before temperature, penalties and
grammar masks) and token ids; token text is filled by a callback (`to_text(ids) -> list[str]`) only
when the client asked for it. Position conventions (API_SPEC 2.1): the logits row at prompt position
i predicts prompt token i+1; the row at the last prompt position predicts the first output token.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# Cap on top_logprobs_num (stated in the README): bigger lists cost more than they tell.
MAX_TOP_LOGPROBS_NUM = 20

ToText = Optional[Callable[[list[int]], list[str]]]


def verify_logprob_args(
    logprob_start_len: int, top_logprobs_num: int, prompt_len: Optional[int] = None
) -> None:
    """ValueError (a 400) for request-level logprob arguments out of range."""
    if isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int):
        raise ValueError(f"logprob_start_len must be an integer, got {logprob_start_len!r}.")
    if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int):
        raise ValueError(f"top_logprobs_num must be an integer, got {top_logprobs_num!r}.")
    if logprob_start_len < -1:
        raise ValueError(f"logprob_start_len must be -1 or at least 0, got {logprob_start_len}.")
    if not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS_NUM:
        raise ValueError(
            f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS_NUM}], got {top_logprobs_num}."
        )
    if prompt_len is not None and logprob_start_len >= prompt_len:
        raise ValueError(
            f"logprob_start_len ({logprob_start_len}) must be less than the number of prompt "
            f"tokens ({prompt_len})."
        )


def input_logprob_rows(prompt_len: int, logprob_start_len: int) -> tuple[int, int]:
    """[first, last) prompt positions whose logits the input logprobs need.

    -1 needs none; k >= 0 needs rows k .. P-2 (predicting tokens k+1 .. P-1). A scheduler asks the
    runner for all logits of an extend only when this range is non-empty.
    """
    if logprob_start_len < 0:
        return (prompt_len, prompt_len)
    return (logprob_start_len, max(logprob_start_len, prompt_len - 1))


def token_logprobs(
    logits: torch.Tensor, target_ids: Sequence[int] | torch.Tensor, top_k: int = 0
) -> tuple[list[float], Optional[list[list[tuple[float, int]]]]]:
    """Log-softmax of each logits row at its target id, and each row's top-k (logprob, id).

    `logits` may also be logprobs already (log_softmax is idempotent up to rounding).
    """
    n = logits.shape[0]
    if n == 0:
        return [], ([] if top_k > 0 else None)
    lp = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.as_tensor(target_ids, dtype=torch.int64, device=lp.device).reshape(n, 1)
    chosen = lp.gather(1, targets).squeeze(1).tolist()
    if top_k <= 0:
        return chosen, None
    vals, ids = torch.topk(lp, min(top_k, lp.shape[-1]), dim=-1)
    tops = [list(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist())]
    return chosen, tops


def _texts(ids: list[int], to_text: ToText) -> list[Optional[str]]:
    return list(to_text(ids)) if to_text is not None and ids else [None] * len(ids)


def make_triples(
    logprobs: Sequence[Optional[float]], ids: Sequence[int], to_text: ToText = None
) -> list[list]:
    texts = _texts(list(ids), to_text)
    return [[lp, int(t), s] for lp, t, s in zip(logprobs, ids, texts)]


def make_top_lists(
    tops: Sequence[Optional[Sequence[tuple[float, int]]]], to_text: ToText = None
) -> list[Optional[list[list]]]:
    """One list of triples per position; a None position stays None (the first prompt token)."""
    out: list[Optional[list[list]]] = []
    for pos in tops:
        if pos is None:
            out.append(None)
        else:
            out.append(make_triples([v for v, _ in pos], [t for _, t in pos], to_text))
    return out


def input_logprobs(
    prompt_ids: Sequence[int],
    logits: torch.Tensor,
    logprob_start_len: int,
    top_logprobs_num: int = 0,
    to_text: ToText = None,
    row_offset: int = 0,
) -> dict:
    """`input_token_logprobs`, `input_top_logprobs`, `normalized_prompt_logprob` for one request.

    `logits` holds raw rows for prompt positions row_offset, row_offset+1, ...; it must cover
    `input_logprob_rows(len(prompt_ids), logprob_start_len)`.
    Entry counts: -1 -> 0; 0 -> P (first is [None, t0, text]); k > 0 -> P - k - 1.
    """
    P = len(prompt_ids)
    first, last = input_logprob_rows(P, logprob_start_len)
    rows = logits[first - row_offset : last - row_offset]
    targets = list(prompt_ids[first + 1 : last + 1])
    lps, tops = token_logprobs(rows, targets, top_logprobs_num)
    ids = targets
    lp_list: list[Optional[float]] = list(lps)
    top_list: list[Optional[list[tuple[float, int]]]] = list(tops or [])
    if logprob_start_len == 0 and P > 0:
        ids = [int(prompt_ids[0])] + ids
        lp_list = [None] + lp_list
        top_list = [None] + top_list
    out = {
        "input_token_logprobs": make_triples(lp_list, ids, to_text),
        "normalized_prompt_logprob": (sum(lps) / len(lps)) if lps else 0.0,
    }
    # With top_logprobs_num == 0 the list is empty; the server decides whether to emit the key.
    out["input_top_logprobs"] = make_top_lists(top_list, to_text) if top_logprobs_num > 0 else []
    return out


def output_logprobs(
    output_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Optional[Sequence[Sequence[tuple[float, int]]]] = None,
    to_text: ToText = None,
) -> dict:
    """`output_token_logprobs` (one triple per generated token) and `output_top_logprobs`.

    `logprobs[i]` / `tops[i]` are what the sampler gave for output token i (see
    `SampleOutput.next_token_logprobs` and `top_logprobs_of`); the scheduler accumulates them.
    """
    return {
        "output_token_logprobs": make_triples(list(logprobs), output_ids, to_text),
        "output_top_logprobs": make_top_lists(list(tops), to_text) if tops is not None else [],
    }


def top_logprobs_of(
    logprobs: torch.Tensor, rows: Sequence[int], top_k: Sequence[int]
) -> list[list[tuple[float, int]]]:
    """Top-k (logprob, id) for selected rows of a step's [bs, vocab] raw logprobs, one topk call."""
    if not rows:
        return []
    kmax = max(top_k)
    sel = logprobs[torch.as_tensor(list(rows), dtype=torch.int64, device=logprobs.device)]
    vals, ids = torch.topk(sel, min(kmax, sel.shape[-1]), dim=-1)
    vals, ids = vals.tolist(), ids.tolist()
    return [list(zip(v[:k], i[:k])) for v, i, k in zip(vals, ids, top_k)]
