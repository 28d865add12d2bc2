"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Rounding follows transformers' LlamaRMSNorm so GPU outputs track the oracle: the residual sum is
rounded to the model dtype, the statistics are taken in float32, the normalised value is rounded
back to the model dtype before the weight multiplies it.

`rmsnorm_ref` is the torch reference with the same signature.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    X, Residual, W, Out,
    stride_x, stride_r, stride_o,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(Residual + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * inv_rms).to(x.dtype)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Out + row * stride_o + offs, (w * normed).to(Out.dtype.element_ty), mask=mask)


def rmsnorm_launch_config(hidden: int) -> dict:
    """Compile-time constants and launch options (shared with the compile test)."""
    block = triton.next_power_of_2(hidden)
    return dict(HIDDEN=hidden, BLOCK=block, num_warps=min(max(block // 256, 1), 8), num_stages=1)


def rmsnorm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight; with `residual`, first residual += x (in place) and normalise that.

    Returns the output, or (output, residual) when a residual was given.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x2)
    res2 = residual.view(-1, hidden) if residual is not None else x2
    if x2.shape[0] > 0:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, res2, weight, out,
            x2.stride(0), res2.stride(0), out.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            **rmsnorm_launch_config(hidden),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, residual)


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rmsnorm_fwd`."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, residual)
