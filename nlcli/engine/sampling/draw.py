"""Drawing one token per row from filtered probabilities by inverse CDF, without a full-vocab sort.

Rows with no top-k/top-p cut draw straight from the vocabulary-ordered CDF (min-p is a threshold,
no order needed). Rows with a cut draw from the descending top candidates of `torch.topk`; a top-p
nucleus too wide for them becomes a probability bar found by bisection. Each row's
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


def _nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor, iters: int = 32) -> torch.Tensor:
    """Per row, the largest probability bar whose tokens at or above it hold >= top_p of the mass.

    Bisection on the bar: `iters` masked sums over the row instead of a full-vocabulary sort.
    """
    lo = torch.zeros_like(probs[:, :1])  # everything kept: mass 1 >= top_p
    hi = probs.amax(dim=-1, keepdim=True)
    need = top_p[:, None]
    for _ in range(iters):
        mid = (lo + hi) * 0.5
        ok = torch.where(probs >= mid, probs, 0.0).sum(dim=-1, keepdim=True) >= need
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo


def draw_truncated(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Token ids for rows with a top-k and/or top-p cut (and maybe min_p)."""
    vocab = probs.shape[-1]
    cand = min(vocab, max(k if k < vocab else TOP_P_CANDIDATES for k in top_k.tolist()))
    vals, ids = torch.topk(probs, cand, dim=-1, sorted=True)
    rank = torch.arange(cand, device=probs.device)[None, :]
    keep = (rank < top_k[:, None]) & (vals > 0)
    # The smallest prefix whose mass reaches top_p, the token that crosses it included.
    # Rows at top_p = 1 skip it: float32 cumsum can pass 1.0 early and drop real tail tokens.
    keep &= ((torch.cumsum(vals, dim=-1) - vals) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep &= vals >= min_p[:, None] * vals[:, :1]
    keep[:, 0] = True  # the most likely token survives every filter
    idx = _inverse_cdf(torch.where(keep, vals, 0.0), u)
    out = ids.gather(1, idx[:, None]).squeeze(1)

    # A top-p row (no top-k) whose nucleus is wider than TOP_P_CANDIDATES draws from a probability
    # bar in vocabulary order instead. The test looks at the row's own first TOP_P_CANDIDATES, so
    # which way a row goes never depends on the rest of the batch.
    wide = (top_k >= vocab) & (vals[:, :TOP_P_CANDIDATES].sum(dim=-1) < top_p)
    if bool(wide.any()):
        rows = torch.nonzero(wide).squeeze(1)
        p = probs[rows]
        bar = torch.maximum(_nucleus_floor(p, top_p[rows]), min_p[rows, None] * p.amax(-1, True))
        out[rows] = _inverse_cdf(torch.where(p >= bar, p, 0.0), u[rows])
    return out
