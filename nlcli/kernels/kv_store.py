"""KV store: write one layer's new K and V rows into the paged pool at `out_cache_loc`, one launch.

Torch needs two index_put launches (plus casts); this kernel does both tensors in one pass, one
program per new token, and reads k/v through their strides (v is a column slice of the fused qkv
projection, not packed). Padding tokens of a captured CUDA graph carry slot 0, the pool's dummy.

`store_kv_ref` is the torch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    K_Buffer, V_Buffer, Loc, K, V,
    stride_kbt, stride_kbh,
    stride_vbt, stride_vbh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Loc + t)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        K_Buffer + slot * stride_kbt + offs_h[:, None] * stride_kbh + offs_d[None, :],
        k.to(K_Buffer.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        V_Buffer + slot * stride_vbt + offs_h[:, None] * stride_vbh + offs_d[None, :],
        v.to(V_Buffer.dtype.element_ty),
        mask=mask,
    )


def store_kv_launch_config(num_heads: int, head_dim: int) -> dict:
    """Compile-time constants and launch options (shared with the compile test)."""
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim)
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
                num_warps=min(max(block_h * block_d // 256, 1), 8), num_stages=1)


def store_kv_fwd(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """k_buffer[loc] = k; v_buffer[loc] = v (buffers [slots, Hkv, D], k/v [T, Hkv, D], loc [T])."""
    num_tokens, num_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k_buffer, v_buffer, loc, k, v,
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        **store_kv_launch_config(num_heads, head_dim),
    )


def store_kv_ref(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Torch reference of `store_kv_fwd`."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)
