"""4-bit weights for torch's CPU kernel `_weight_int4pack_mm_for_cpu`.

The kernel computes w = (q - 8) * scale + zero per group of `GROUP` weights along K, q in 0..15.
GGUF's Q4_1 stores w = d * q + m per block of 32, so scale = d, zero = m + 8 d carries a Q4_1
file's weights over unchanged (Q4_0 is the case m = -8 d). `grid_of` recovers (q, d, m) from the
dequantized float weights and says whether they lie exactly on such a grid: then the 4-bit form is
the checkpoint's own, not a new rounding. Otherwise `quantize` rounds to the same form (min/max per
group). torch's vectorized kernel takes bfloat16 activations and scales; float32 runs a reference
loop, exact but ~10x slower (measured on AVX2 and AVX-512), so it is for checking only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

GROUP = 32


class Int4Weights(NamedTuple):
    packed: torch.Tensor  # uint8, torch's CPU int4 layout
    scales_zeros: torch.Tensor  # [K / GROUP, N, 2]: scale, zero
    out_features: int


# Rows per chunk: the temporaries of a chunk stay in cache and allocate no fresh pages (whole
# 100 MB matrices made every elementwise op fault its pages in, ~1 GB/s).
_CHUNK_ROWS = 256


def _chunk_grid(w: torch.Tensor, check: bool):
    """(q, d, m, on_grid) of a few rows: min/max per 32-block, codes rounded to 0..15."""
    blocks = w.float().reshape(w.shape[0], -1, GROUP)
    lo, hi = torch.aminmax(blocks, dim=-1, keepdim=True)
    step = (hi - lo) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = blocks.sub(lo).div_(safe).round_().clamp_(0, 15)
    on_grid = True
    if check:
        # A weight off the grid misses it by up to step / 2; rounding to the model's dtype by
        # a few ulps of |w| (bfloat16 weights were rounded from the file's grid at load).
        ulps = max(2 * torch.finfo(w.dtype).eps, 8 * torch.finfo(torch.float32).eps)
        tol = 1e-3 * step + ulps * torch.maximum(lo.abs(), hi.abs())
        on_grid = bool((q.mul(step).add_(lo).sub_(blocks).abs_() <= tol).all())
    return q.to(torch.uint8), step, lo, on_grid


def _grid(w: torch.Tensor, exact_only: bool):
    if w.dim() != 2 or w.shape[1] % GROUP:
        return None
    parts = []
    for rows in torch.split(w, _CHUNK_ROWS):
        part = _chunk_grid(rows, check=exact_only)
        if not part[3]:
            return None
        parts.append(part)
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def grid_of(w: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, d, m) with w == d * q + m per 32-block (to float rounding), or None if w is not 4-bit.

    llama.cpp's Q4_1 sets m = block min and d = (max - min) / 15, so both ends of every block sit
    on codes 0 and 15 and the grid can be read back from the values alone."""
    return _grid(w, exact_only=True)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit rounding, min/max per 32-group: (q, d, m)."""
    return _grid(w, exact_only=False)


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> Int4Weights:
    """torch's packed form of (q, d, m) from `grid_of` / `quantize`; scales in `dtype`."""
    n, groups, _ = q.shape
    codes = q.reshape(n, groups * GROUP).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    zero = m + 8 * d
    sz = torch.cat([d, zero], -1).transpose(0, 1).contiguous().to(dtype)  # [groups, N, 2]
    return Int4Weights(packed, sz, n)


def unpack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float weights (q, d, m) stand for; the reference the tests compare against."""
    return (q.float() * d + m).reshape(q.shape[0], -1)


def int4_mm(x: torch.Tensor, weights: Int4Weights) -> torch.Tensor:
    """x [M, K] @ w.T in the scales' dtype (the caller casts x)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weights.packed, GROUP,
                                                      weights.scales_zeros)
