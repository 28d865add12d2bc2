"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Computed in float32 and cast back, as transformers does, so float32 and bfloat16 runs both match
the reference implementation's rounding. On CUDA the add and the norm run as one Triton kernel
(nlcli/kernels/rmsnorm.py, same rounding) that updates the residual in place. Elsewhere the add is
in place too, and float32 runs torch's one-op `F.rms_norm` (the same arithmetic, bit for bit, where
the reference formula takes seven ops, each a dispatch and an allocation).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def fused_rmsnorm() -> Optional[Callable]:
    """The Triton kernel, or None where Triton is missing (then torch does the work)."""
    try:
        from nlcli.kernels.rmsnorm import rmsnorm_fwd
    except ImportError:
        return None
    return rmsnorm_fwd


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual); the CUDA
        kernel writes x + residual into `residual` itself (callers hand it over, never reuse it)."""
        if x.is_cuda and (fused := fused_rmsnorm()) is not None:
            if residual is not None and not residual.is_contiguous():
                residual = residual.contiguous()
            return fused(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual = residual.add_(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
