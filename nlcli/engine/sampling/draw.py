"""Drawing one token per row from filtered probabilities by inverse CDF, without a full-vocab sort.

Rows with no top-k/top-p cut draw straight from the vocabulary-ordered CDF (min-p is a threshold,
no order needed). Rows with a cut draw from the descending top candidates: `torch.topk` over a
bounded candidate count, widened to a full sort only when a row's nucleus does not fit. Each row's
token depends only on its own probabilities, its own filters and its uniform `u`, so a seeded request
samples the same token whatever else is in the batch.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# Candidates taken for a top-p row without top-k; nearly every nucleus fits, the rest get a sort.
TOP_P_CANDIDATES = 256


def seeded_uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step): splitmix64 of the pair."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) * (1.0 / (1 << 53))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index per row where the CDF of `weights` (>= 0, one positive at least) passes u."""
    # float32 like the probabilities: a float64 scan costs several times more on CPU, and a running
    # sum of non-negative terms stays monotone, which is all the search needs.
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, the first column whose CDF exceeds the target has positive
    # weight (a zero weight leaves the running sum unchanged), so masked tokens are never drawn.
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(u.to(cdf.dtype)[:, None] * total, below_total)
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def draw_unsorted(probs: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids for rows without top-k/top-p; min_p drops tokens below min_p * max prob."""
    bar = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    weights = torch.where(probs >= bar, probs, 0.0)
    return _inverse_cdf(weights, u)


def draw_truncated(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Token ids for rows with a top-k and/or top-p cut (and maybe min_p)."""
    vocab = probs.shape[-1]
    ks = top_k.tolist()
    cand = min(vocab, max(k if k < vocab else TOP_P_CANDIDATES for k in ks))
    vals, ids = torch.topk(probs, cand, dim=-1, sorted=True)
    # A row whose cut reaches past the candidates (top_k beyond them and a nucleus that the
    # candidates' mass does not cover) needs the whole order.
    short = (top_k > cand) & (vals.sum(dim=-1) < top_p)
    if cand < vocab and bool(short.any()):
        vals, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        cand = vocab
    rank = torch.arange(cand, device=probs.device)[None, :]
    keep = (rank < top_k[:, None]) & (vals > 0)
    # The smallest prefix whose mass reaches top_p, the token that crosses it included.
    # Rows at top_p = 1 skip it: float32 cumsum can pass 1.0 early and drop real tail tokens.
    keep &= ((torch.cumsum(vals, dim=-1) - vals) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep &= vals >= min_p[:, None] * vals[:, :1]
    keep[:, 0] = True  # the most likely token survives every filter
    idx = _inverse_cdf(torch.where(keep, vals, 0.0), u)
    return ids.gather(1, idx[:, None]).squeeze(1)
