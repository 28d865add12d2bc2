"""Logprob arithmetic on raw logits (the model's distribution before temperature, penalties and
grammar masks): the request-level argument check, which prompt rows are needed, per-row logprobs
and top-k. The engine's collector (scheduler/logprobs.py) gathers them per request; the API process
builds the `[logprob, token_id, text]` triples (api/logprobs.py). Position conventions (API_SPEC
2.1): the logits row at prompt position i predicts prompt token i+1; the row at the last prompt
position predicts the first output token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Cap on top_logprobs_num (stated in the README): bigger lists cost more than they tell.
MAX_TOP_LOGPROBS_NUM = 20


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
    if prompt_len is not None and logprob_start_len > prompt_len:
        raise ValueError(
            f"logprob_start_len={logprob_start_len} is higher than the number of input tokens "
            f"({prompt_len}). Please use a smaller logprob_start_len."
        )


def input_logprob_rows(prompt_len: int, logprob_start_len: int) -> tuple[int, int]:
    """[first, last) prompt positions whose logits the input logprobs need.

    -1 needs none; k >= 0 needs rows k .. P-2 (predicting tokens k+1 .. P-1; the entry of token k
    itself is reported with a null logprob, as SGLang does). A scheduler asks the runner for all
    logits of an extend only when this range is non-empty.
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


def ids_logprobs(logits: torch.Tensor, token_ids: Sequence[int]) -> list[list[float]]:
    """Log-softmax of each logits row at the given ids (`token_ids_logprob`), in their order."""
    if logits.shape[0] == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.as_tensor(list(token_ids), dtype=torch.int64, device=lp.device)
    return lp.index_select(1, idx).tolist()
