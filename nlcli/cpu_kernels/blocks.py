"""Weights in blocks of 32 along K, the layouts of csrc/gemm_blocks.c (GGUF's Q4_1 and Q8_0).

`q4_from_grid` takes the (q, d, m) of layers/quantization/int4_pack.py (a GGUF's own 4-bit grid or
a new rounding) and `q8_quantize` rounds any weight to Q8_0: one float16 scale per block, absmax
mapped to 127. A weight that came from a Q8_0 file lies on that grid already, so rounding it again
gives back the file's own codes and scales: nothing is lost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 32


class Q4Blocks(NamedTuple):
    codes: torch.Tensor  # uint8 [N, K / 2]: element j in the low nibble, j + 16 in the high one
    dm: torch.Tensor  # float16 [N, K / 32, 2]: scale d and minimum m per block
    out_features: int
    in_features: int


class Q8Blocks(NamedTuple):
    codes: torch.Tensor  # int8 [N, K]
    d: torch.Tensor  # float16 [N, K / 32]
    out_features: int
    in_features: int


def q4_from_grid(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4Blocks:
    """q uint8 [N, K/32, 32] in 0..15, d and m [N, K/32, 1]."""
    n, nb, _ = q.shape
    codes = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, nb * 16).contiguous()
    dm = torch.cat([d, m], -1).to(torch.float16).contiguous()
    return Q4Blocks(codes, dm, n, nb * BLOCK)


def q4_dequantize(w: Q4Blocks) -> torch.Tensor:
    n, nb = w.out_features, w.in_features // BLOCK
    c = w.codes.reshape(n, nb, 16)
    q = torch.cat([c & 0x0F, c >> 4], -1).float()
    dm = w.dm.float()
    return (q * dm[..., :1] + dm[..., 1:]).reshape(n, -1)


# Rows per chunk while rounding: the temporaries stay small (see int4_pack._CHUNK_ROWS).
_CHUNK_ROWS = 1024


def q8_quantize(w: torch.Tensor) -> Q8Blocks:
    n, k = w.shape
    codes, scales = [], []
    for rows in torch.split(w, _CHUNK_ROWS):
        blocks = rows.float().reshape(rows.shape[0], -1, BLOCK)
        d = (blocks.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        safe = torch.where(d > 0, d.float(), torch.ones_like(d, dtype=torch.float32))
        q = blocks.div(safe).round_().clamp_(-127, 127).to(torch.int8)
        codes.append(q.reshape(rows.shape[0], k))
        scales.append(d.reshape(rows.shape[0], -1))
    return Q8Blocks(torch.cat(codes).contiguous(), torch.cat(scales).contiguous(), n, k)


def q8_dequantize(w: Q8Blocks) -> torch.Tensor:
    n, nb = w.out_features, w.in_features // BLOCK
    return (w.codes.reshape(n, nb, BLOCK).float() * w.d.float()[..., None]).reshape(n, -1)

