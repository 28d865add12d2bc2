"""Rotary position embeddings (rotate-half layout, as in HF Llama/Mistral/Qwen checkpoints).

A cos/sin table over all positions is built once in float32; each forward gathers rows by the
batch's absolute positions, so prefix-cached extends and decodes need no per-request state. The
model gathers them once per forward (`cos_sin`) and every layer rotates q and k together in one
pass (`rotate` on the [T, H + Hkv, D] q|k block): four ops per layer instead of a dozen per tensor,
with the same roundings as the two-halves formula.
Supports rope types default, linear and llama3, read from `rope_parameters` (transformers 5) or
`rope_theta` + `rope_scaling` (older configs).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


def rope_parameters(config: Any) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def _inv_freq(dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: Optional[int] = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = _inv_freq(self.rotary_dim, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [cos | cos | -sin | sin] per position: x * cos2 + swap_halves(x) * sin2 is
        # (x1 cos - x2 sin, x2 cos + x1 sin) exactly (negation is exact), from one gather.
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos_sin_cache", torch.cat((cos, cos, -sin, sin), dim=-1),
                             persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `positions` as ([T, 1, r] cos2, [T, 1, r] sin2) in `dtype`, for `rotate`."""
        cs = self.cos_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)
        return cs[..., : self.rotary_dim], cs[..., self.rotary_dim:]

    def rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, N, D] (q and k heads together) -> a rotated copy, in x's dtype (the tables were
        cast to it, as transformers casts cos/sin before rotating)."""
        cos, sin = cos_sin
        r = self.rotary_dim
        if r < x.shape[-1]:  # partial rotary: the two-halves formula on the first r dims
            return self._rotate(x, cos[..., : r // 2], sin[..., r // 2:])
        T, n = x.shape[0], x.shape[1]
        swapped = x.reshape(T, n, 2, r // 2).flip(2).view(T, n, r)
        return x * cos + swapped * sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        x_rot = x[..., :r]
        half = r // 2
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if r < x.shape[-1]:
            out = torch.cat((out, x[..., r:]), dim=-1)
        return out


def get_rope(config: Any, head_dim: int, max_position: int) -> RotaryEmbedding:
    params = rope_parameters(config)
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    return RotaryEmbedding(head_dim, max_position, params, int(head_dim * partial))
