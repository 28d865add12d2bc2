"""Paged extend attention: new tokens attend causally over their cached prefix and each other.

Request i brings extend_len_i new query tokens, packed back to back in q, on top of prefix_len_i
cached ones. The new tokens' K/V are already in the buffers, so every key (prefix and new alike)
is read through `req_to_token[row_i, :prefix_len_i + extend_len_i]`; token j (position
prefix_len_i + j) sees keys 0..prefix_len_i + j.

One program per (request, query head, block of new tokens) runs an online softmax over the keys
its block can see, stopping at the block's causal frontier rather than the request's end.

`extend_attention_ref` is the torch reference with the same signature.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nlcli.kernels.common import dot_precision, kv_group_of, lens_on


@triton.jit
def _extend_kernel(
    Q, K_Buffer, V_Buffer, O, Req_to_token, Req_pool_indices, Prefix_lens, Extend_lens,
    Qo_start_loc,
    sm_scale,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_r2t,
    KV_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = h // KV_GROUP

    extend_len = tl.load(Extend_lens + b)
    # The grid is sized for the longest request; shorter ones leave trailing blocks idle.
    if m_block * BLOCK_M < extend_len:
        prefix_len = tl.load(Prefix_lens + b)
        qo_start = tl.load(Qo_start_loc + b)
        row = tl.load(Req_pool_indices + b)

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < extend_len
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(
            Q + (qo_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=q_mask,
            other=0.0,
        )
        q_pos = prefix_len + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = prefix_len + tl.minimum((m_block + 1) * BLOCK_M, extend_len)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            slots = tl.load(Req_to_token + row * stride_r2t + offs_n, mask=mask_n, other=0)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                K_Buffer + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
            # Key 0 is visible to every row, so the first block sets a finite max for all rows
            # and later fully-masked rows only contribute exp(-inf) = 0.
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            rescale = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * rescale + tl.sum(p, 1)
            v = tl.load(
                V_Buffer + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * rescale[:, None] + tl.dot(
                p.to(v.dtype), v, input_precision=DOT_PRECISION
            )
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            O + (qo_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=q_mask,
        )


def extend_launch_config(
    head_dim: int, kv_group: int, dtype: torch.dtype, on_cuda: bool
) -> dict:
    """Compile-time constants and launch options of the kernel (shared with the compile test)."""
    if not on_cuda:
        block_m = block_n = 16  # interpreter: small tiles keep tiny test shapes multi-block
    elif dtype == torch.float32 or head_dim > 128:
        block_m = block_n = 32  # fp32 / wide heads: stay inside shared memory
    else:
        block_m = block_n = 64
    return dict(
        KV_GROUP=kv_group,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=dot_precision(dtype),
        num_warps=4 if head_dim <= 64 else 8,
        num_stages=2,
    )


def extend_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    sm_scale: float,
    *,
    max_extend_len: Optional[int] = None,
    qo_start_loc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of q [num_tokens, H, D] (requests packed) over paged K/V; write o.

    Pass `max_extend_len` (known on the host from the batch) to avoid a device sync, and
    `qo_start_loc` (each request's first row in q: the exclusive cumsum of extend_lens) to share
    one computation across layers.
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_group = kv_group_of(q, k_buffer, v_buffer, o)
    prefix_lens = lens_on(prefix_lens, q.device)
    extend_lens = lens_on(extend_lens, q.device)
    req_pool_indices = lens_on(req_pool_indices, q.device)
    bs = extend_lens.shape[0]
    if bs == 0 or num_tokens == 0:
        return o
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max())
    if qo_start_loc is None:
        qo_start_loc = torch.cumsum(extend_lens, 0) - extend_lens

    config = extend_launch_config(head_dim, kv_group, q.dtype, q.is_cuda)
    grid = (bs, num_heads, triton.cdiv(max_extend_len, config["BLOCK_M"]))
    _extend_kernel[grid](
        q, k_buffer, v_buffer, o, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        qo_start_loc,
        sm_scale,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        o.stride(0), o.stride(1),
        req_to_token.stride(0),
        **config,
    )
    return o


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    sm_scale: float,
    *,
    max_extend_len: Optional[int] = None,
    qo_start_loc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference of `extend_attention_fwd` (the keyword extras only save the kernel work)."""
    del max_extend_len, qo_start_loc
    num_heads = q.shape[1]
    kv_group = num_heads // k_buffer.shape[1]
    rows = lens_on(req_pool_indices, torch.device("cpu")).tolist()
    prefixes = lens_on(prefix_lens, torch.device("cpu")).tolist()
    start = 0
    for i, n_new in enumerate(lens_on(extend_lens, torch.device("cpu")).tolist()):
        prefix_len = prefixes[i]
        seq_len = prefix_len + n_new
        slots = req_to_token[rows[i], :seq_len]
        k = k_buffer[slots].float().repeat_interleave(kv_group, dim=1)  # [L, H, D]
        v = v_buffer[slots].float().repeat_interleave(kv_group, dim=1)
        qi = q[start : start + n_new].float()  # [E, H, D]
        scores = torch.einsum("ehd,lhd->hel", qi, k) * sm_scale
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out = torch.einsum("hel,lhd->ehd", scores.softmax(-1), v)
        o[start : start + n_new] = out.to(o.dtype)
        start += n_new
    return o
