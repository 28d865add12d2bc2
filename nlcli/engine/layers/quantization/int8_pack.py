"""int8 weights, one symmetric scale per output channel, for torch's `_weight_int8pack_mm`
(y = x @ (q * scale).T). Its vectorized CPU path takes bfloat16 activations; float32 runs a
reference loop (exact, several times slower), kept for checking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Weights(NamedTuple):
    q: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32): w ~ q * scale per row, absmax mapped to 127."""
    w = w.float()
    scale = w.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Weights:
    return Int8Weights(q.contiguous(), scale.to(dtype))


def unpack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_mm(x: torch.Tensor, weights: Int8Weights) -> torch.Tensor:
    """x [M, K] @ w.T in the scales' dtype (the caller casts x)."""
    return torch.ops.aten._weight_int8pack_mm(x, weights.q, weights.scales)
