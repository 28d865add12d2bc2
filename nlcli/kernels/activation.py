"""SiLU-and-mul: silu(gate) * up over the fused gate_up projection's output, one pass.

Torch runs it as three kernels with two intermediates of the MLP's width; this reads the [T, 2d]
input once and writes [T, d]. Rounding follows torch's `F.silu(gate) * up` in the input dtype: the
SiLU is computed in float32 and rounded to the input dtype before the multiply.

`silu_and_mul_ref` is the torch reference with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    X, Out,
    stride_x, stride_o,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul_launch_config(d: int) -> dict:
    """Compile-time constants and launch options (shared with the compile test)."""
    return dict(D=d, BLOCK=min(triton.next_power_of_2(d), 1024), num_warps=4, num_stages=1)


def silu_and_mul_fwd(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] laid out as [gate | up] -> silu(gate) * up [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    assert x2.stride(-1) == 1
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        config = silu_and_mul_launch_config(d)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, config["BLOCK"]))](
            x2, out, x2.stride(0), out.stride(0), **config,
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_and_mul_fwd`."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
