"""Gated MLP activation: act(gate) * up over the fused gate_up projection's output (SiLU for every
supported family; GELU variants for configs that name them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] laid out as [gate | up] -> act(gate) * up: [..., d]."""

    def __init__(self, hidden_act: str = "silu"):
        super().__init__()
        if hidden_act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r} (supported: {sorted(_ACTS)})")
        self.act = _ACTS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]
