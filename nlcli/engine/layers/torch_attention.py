"""TorchAttentionBackend: paged attention in plain torch (SDPA), for the CPU and GPUs without Triton.

`plan(batch)` runs once per forward and returns a `TorchAttentionPlan` (gather indices, masks) that
the ForwardBatch carries; every layer's `forward` reads it from there, so the backend object holds
no per-forward state. Decodes run as one call of nl's C kernel (cpu_kernels/csrc/
decode_attention.c), which reads K/V from the pool in place, for float32 and bfloat16 pools on the
CPU, and otherwise as one padded, masked SDPA call over a gathered copy; extends run one SDPA call
per request (the causal mask is aligned to the cached prefix), in the 4-D layout of the fused
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from nlcli.cpu_kernels import ops as cpu_ops
from nlcli.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from nlcli.engine.layers.attention import Attention


@dataclass
class _DecodeGroup:
    token_index: Optional[torch.Tensor]  # which rows of the flat token axis (None: all of them)
    rows: torch.Tensor  # [n] req_to_token rows
    seq_lens: torch.Tensor  # [n]
    # The rest is for SDPA; None when nl's C kernel reads the pool in place.
    flat_slots: Optional[torch.Tensor]  # [n * max_len] KV slots, row-major, padding -> 0
    max_len: int
    # [n, 1, 1, max_len] additive float mask (0 attended, -inf padding); None when no row is padded.
    # Additive and built once per forward: a bool mask is converted by SDPA in every layer.
    mask: Optional[torch.Tensor]
    # One request whose slots are one ascending run: its K/V are read in place, as a view of the
    # pool from this slot (no gather). None otherwise.
    run_start: Optional[int] = None


@dataclass
class _ExtendSeq:
    start: int
    end: int
    slots: torch.Tensor  # [seq_len]
    mask: Optional[torch.Tensor]  # [extend_len, seq_len] additive, None when plain causal (no prefix)


@dataclass
class TorchAttentionPlan:
    """One forward's attention plan: requests adding one token share `decode`, the rest `extends`."""

    decode: Optional[_DecodeGroup] = None
    extends: list[_ExtendSeq] = field(default_factory=list)


class TorchAttentionBackend:
    """Portable attention in torch (SDPA); `plan(batch)` once per forward, `forward` per layer."""

    def __init__(self, req_to_token_pool, token_to_kv_pool):
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        # nl's C decode kernel (cpu_kernels) takes float32 or bfloat16 pools on the CPU.
        pool = token_to_kv_pool
        self.c_decode = (pool.device.type == "cpu" and pool.dtype in cpu_ops.KV_DTYPES
                         and req_to_token_pool.req_to_token.is_contiguous() and cpu_ops.available())

    def plan(self, batch: ForwardBatch) -> TorchAttentionPlan:
        req_to_token = self.req_to_token_pool.req_to_token
        device = batch.input_ids.device
        if batch.forward_mode == ForwardMode.DECODE:
            return TorchAttentionPlan(decode=self._plan_decode(
                req_to_token, batch.req_pool_indices, batch.seq_lens, None, batch.seq_lens_cpu))
        # Mixed batch: requests adding one token share one batched call; the rest run one by one.
        plan = TorchAttentionPlan()
        one, start, rows_cpu = [], 0, None
        kv_dtype = self.token_to_kv_pool.dtype
        for i, (pre, ext) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            if ext == 1 and pre > 0:
                one.append((i, start))
            else:
                if rows_cpu is None:  # a host copy once per forward, never per layer
                    rows_cpu = batch.req_pool_indices.tolist()
                seq = pre + ext
                slots = req_to_token[rows_cpu[i], :seq]
                mask = None
                if pre > 0:  # query j sits at position pre + j: bottom-right aligned causal mask
                    allowed = torch.ones(ext, seq, dtype=torch.bool, device=device).tril(diagonal=pre)
                    mask = torch.zeros(ext, seq, dtype=kv_dtype, device=device)
                    mask.masked_fill_(~allowed, float("-inf"))
                plan.extends.append(_ExtendSeq(start, start + ext, slots, mask))
            start += ext
        if one:
            idx = torch.tensor([i for i, _ in one], dtype=torch.int64, device=device)
            tok = torch.tensor([s for _, s in one], dtype=torch.int64, device=device)
            lens_cpu = [batch.seq_lens_cpu[i] for i, _ in one]
            plan.decode = self._plan_decode(
                req_to_token, batch.req_pool_indices[idx], batch.seq_lens[idx], tok, lens_cpu
            )
        return plan

    def _plan_decode(self, req_to_token, rows, seq_lens, token_index, seq_lens_cpu) -> _DecodeGroup:
        max_len = max(seq_lens_cpu)
        if self.c_decode:
            return _DecodeGroup(token_index, rows, seq_lens, None, max_len, None)
        slots = req_to_token[rows, :max_len]
        pool = self.token_to_kv_pool
        if len(seq_lens_cpu) == 1 and rows.device.type == "cpu":
            # A lone request's slots are usually one run (the allocator hands out ascending
            # slots); reading the host tensor here costs no device sync on the CPU.
            start = int(slots[0, 0])
            if max_len == 1 or bool((slots[0, 1:] - slots[0, :-1] == 1).all()):
                return _DecodeGroup(token_index, rows, seq_lens, slots.reshape(-1), max_len, None,
                                    run_start=start)
        mask = None
        if min(seq_lens_cpu) != max_len:
            valid = torch.arange(max_len, device=rows.device).unsqueeze(0) < seq_lens.unsqueeze(1)
            slots = slots.masked_fill(~valid, 0)
            mask = torch.zeros(valid.shape, dtype=pool.dtype, device=rows.device)
            mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        # (Gathering into buffers shared by every layer instead of fresh tensors measured no
        # faster: paired decode steps at batch 8 and 32 on a 2-core EPYC.)
        return _DecodeGroup(token_index, rows, seq_lens, slots.reshape(-1), max_len, mask)

    def forward(self, q, k, v, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        plan: TorchAttentionPlan = batch.attn_plan
        self.token_to_kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        o = None
        if plan.decode is not None:
            d = plan.decode
            qd = q if d.token_index is None else q[d.token_index]
            if d.flat_slots is None:
                out = cpu_ops.decode_attention(qd, k_buf, v_buf, self.req_to_token_pool.req_to_token,
                                               d.rows, d.seq_lens, layer.scaling).to(q.dtype)
            else:
                out = self._decode(qd, k_buf, v_buf, layer, d)
            if d.token_index is None:
                return out
            o = torch.empty_like(q)
            o[d.token_index] = out
        if o is None:
            o = torch.empty_like(q)
        for s in plan.extends:
            o[s.start : s.end] = self._extend(q[s.start : s.end], k_buf, v_buf, layer, s)
        return o

    @staticmethod
    def _extend(q, k_buf, v_buf, layer: Attention, s: _ExtendSeq) -> torch.Tensor:
        """q [ext, H, D] -> [ext, H, D]: one request's new tokens over its prefix and themselves.

        SDPA gets 4-D (1, heads, seq, dim) tensors: only that layout reaches torch's fused CPU
        kernel (flash attention for CPU, which also takes the additive prefix mask and GQA); 3-D
        inputs fall back to the unfused reference path, several times slower at prefill sizes."""
        qs = q.transpose(0, 1).unsqueeze(0)  # [1, H, ext, D]
        ks = k_buf.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, seq, D]
        vs = v_buf.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            qs.to(ks.dtype), ks, vs, attn_mask=s.mask, is_causal=s.mask is None,
            scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return out[0].transpose(0, 1).to(q.dtype)

    @staticmethod
    def _decode(q, k_buf, v_buf, layer: Attention, d: _DecodeGroup) -> torch.Tensor:
        """q [n, H, D] -> [n, H, D]: one query token per request over its padded slots.

        A lone request whose slots form one run is read as a view of the pool. Otherwise
        index_select on the flat slot list (several times faster on CPU than advanced indexing
        with a 2-D index) gathers a copy. The query heads that share a KV
        head go in SDPA's query-length axis ([n, Hkv, H/Hkv, D]): no mask is causal here, so this
        is exact and K/V are never repeated per query head (what enable_gqa does)."""
        n, hkv, dim = q.shape[0], layer.num_kv_heads, layer.head_dim
        if d.run_start is not None:  # in place: a view of the pool, no copy
            run = slice(d.run_start, d.run_start + d.max_len)
            kd, vd = k_buf[run], v_buf[run]
        else:
            kd, vd = k_buf.index_select(0, d.flat_slots), v_buf.index_select(0, d.flat_slots)
        kd = kd.view(n, d.max_len, hkv, dim).transpose(1, 2)
        vd = vd.view(n, d.max_len, hkv, dim).transpose(1, 2)
        qg = q.reshape(n, hkv, layer.num_heads // hkv, dim).to(kd.dtype)
        out = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=d.mask, scale=layer.scaling)
        return out.reshape(n, layer.num_heads, dim).to(q.dtype)
