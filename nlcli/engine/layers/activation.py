"""Gated MLP activation: act(gate) * up over the fused gate_up projection's output (SiLU for every
supported family; GELU variants for configs that name them). On CUDA, SiLU runs as one Triton
kernel (nlcli/kernels/activation.py) instead of three torch kernels with two intermediates."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@functools.lru_cache(maxsize=None)
def fused_silu_and_mul() -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The Triton kernel, or None where Triton is missing (then torch does the work)."""
    try:
        from nlcli.kernels.activation import silu_and_mul_fwd
    except ImportError:
        return None
    return silu_and_mul_fwd


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] laid out as [gate | up] -> act(gate) * up: [..., d]."""

    def __init__(self, hidden_act: str = "silu"):
        super().__init__()
        if hidden_act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r} (supported: {sorted(_ACTS)})")
        self.act = _ACTS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.act is F.silu and (fused := fused_silu_and_mul()) is not None:
            return fused(x)
        d = x.shape[-1] // 2
        return self.act(x[..., :d]).mul_(x[..., d:])  # in place: one allocation, not two
