"""Paged decode attention: one new query token per request over its req_to_token row.

Split-KV in two stages so a small batch still fills a GPU: stage 1 gives every (request, head
group, KV split) its own program, which computes a softmax-normalised partial output and the
split's log-sum-exp; stage 2 merges the splits per (request, head). One stage-1 program serves all
query heads that share a KV head (GQA), so each K/V row is read once per group, and the head block
is padded to 16 rows so `tl.dot` can use tensor cores.

The split length is derived from `seq_lens` inside the kernels, so the launch grid depends only on
shapes: no host sync, safe to capture in a CUDA graph.

`decode_attention_ref` is the torch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlcli.kernels.common import dot_precision, heads_per_program, kv_group_of, lens_on

DEFAULT_NUM_KV_SPLITS = 8


@triton.jit
def _split_bounds(seq_len, split, NUM_KV_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Splits are whole KV blocks, so short sequences use fewer splits instead of tiny ones.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_KV_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    return start, end


@triton.jit
def _decode_stage1_kernel(
    Q, K_Buffer, V_Buffer, Req_to_token, Req_pool_indices, Seq_lens, Mid_O, Mid_Lse,
    sm_scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_r2t,
    stride_mob, stride_moh, stride_mos,
    stride_lb, stride_lh,
    KV_GROUP: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    first_head = head_block * HEADS_PER_PROG
    kv_head = first_head // KV_GROUP
    offs_h = first_head + tl.arange(0, BLOCK_H)
    mask_h = tl.arange(0, BLOCK_H) < HEADS_PER_PROG
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    seq_len = tl.load(Seq_lens + b)
    row = tl.load(Req_pool_indices + b)
    start, end = _split_bounds(seq_len, split, NUM_KV_SPLITS, BLOCK_N)

    if end > start:
        q = tl.load(
            Q + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slots = tl.load(Req_to_token + row * stride_r2t + offs_n, mask=mask_n, other=0)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                K_Buffer + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
            # Every block holds at least one valid key, so m_new stays finite (no NaN rows).
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
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

        out_mask = mask_h[:, None] & mask_d[None, :]
        tl.store(
            Mid_O + b * stride_mob + offs_h[:, None] * stride_moh + split * stride_mos
            + offs_d[None, :],
            acc / l_i[:, None],
            mask=out_mask,
        )
        tl.store(
            Mid_Lse + b * stride_lb + offs_h * stride_lh + split, m_i + tl.log(l_i), mask=mask_h
        )


@triton.jit
def _decode_stage2_kernel(
    Mid_O, Mid_Lse, O, Seq_lens,
    stride_mob, stride_moh, stride_mos,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    seq_len = tl.load(Seq_lens + b)

    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(0, NUM_KV_SPLITS):
        start, end = _split_bounds(seq_len, split, NUM_KV_SPLITS, BLOCK_N)
        # Empty splits were never written by stage 1: skip them rather than read garbage.
        if end > start:
            lse = tl.load(Mid_Lse + b * stride_lb + h * stride_lh + split)
            part = tl.load(
                Mid_O + b * stride_mob + h * stride_moh + split * stride_mos + offs_d,
                mask=mask_d,
                other=0.0,
            )
            m_new = tl.maximum(m, lse)
            old_scale = tl.exp(m - m_new)
            weight = tl.exp(lse - m_new)
            acc = acc * old_scale + weight * part
            denom = denom * old_scale + weight
            m = m_new
    # seq_len == 0 (padding rows of a captured graph) yields zeros instead of NaN.
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_launch_config(
    head_dim: int, kv_group: int, dtype: torch.dtype, on_cuda: bool, num_kv_splits: int
) -> tuple[dict, dict]:
    """Compile-time constants and launch options of both stages (shared with the compile test)."""
    if not on_cuda:
        block_n = 16  # interpreter: small tiles keep tiny test shapes multi-block
    elif dtype == torch.float32 or head_dim > 128:
        block_n = 32  # K and V tiles of two pipeline stages must fit in shared memory
    else:
        block_n = 64
    block_h = 16  # tl.dot needs at least 16 rows; unused head rows are masked
    block_d = triton.next_power_of_2(head_dim)
    stage1 = dict(
        KV_GROUP=kv_group,
        HEADS_PER_PROG=heads_per_program(kv_group, block_h),
        HEAD_DIM=head_dim,
        NUM_KV_SPLITS=num_kv_splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(dtype),
        num_warps=4,
        num_stages=2,
    )
    stage2 = dict(
        HEAD_DIM=head_dim,
        NUM_KV_SPLITS=num_kv_splits,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )
    return stage1, stage2


def decode_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    num_kv_splits: int = DEFAULT_NUM_KV_SPLITS,
) -> torch.Tensor:
    """Attend q [bs, H, D] over each request's first seq_len slots; write and return o."""
    bs, num_heads, head_dim = q.shape
    kv_group = kv_group_of(q, k_buffer, v_buffer, o)
    if bs == 0:
        return o
    seq_lens = lens_on(seq_lens, q.device)
    req_pool_indices = lens_on(req_pool_indices, q.device)

    stage1, stage2 = decode_launch_config(head_dim, kv_group, q.dtype, q.is_cuda, num_kv_splits)
    mid_o = torch.empty(
        (bs, num_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty((bs, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)

    _decode_stage1_kernel[(bs, num_heads // stage1["HEADS_PER_PROG"], num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        sm_scale,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        **stage1,
    )
    _decode_stage2_kernel[(bs, num_heads)](
        mid_o, mid_lse, o, seq_lens,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1),
        **stage2,
    )
    return o


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    num_kv_splits: int = DEFAULT_NUM_KV_SPLITS,
) -> torch.Tensor:
    """Torch reference of `decode_attention_fwd` (num_kv_splits only shapes the Triton launch)."""
    del num_kv_splits
    num_heads = q.shape[1]
    kv_group = num_heads // k_buffer.shape[1]
    cpu = torch.device("cpu")
    rows = lens_on(req_pool_indices, cpu).tolist()
    for i, seq_len in enumerate(lens_on(seq_lens, cpu).tolist()):
        if seq_len == 0:
            o[i] = 0
            continue
        slots = req_to_token[rows[i], :seq_len]
        k = k_buffer[slots].float().repeat_interleave(kv_group, dim=1)  # [L, H, D]
        v = v_buffer[slots].float().repeat_interleave(kv_group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].float(), k) * sm_scale
        o[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(o.dtype)
    return o
