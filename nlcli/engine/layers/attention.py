"""Attention over the paged KV pool.

`Attention` is what models call: (q, k, v) of the batch's new tokens in, attention output out. It
writes the new K/V into the pool at `out_cache_loc` and attends, for request i, over the slots
`req_to_token[req_pool_indices[i], :seq_lens[i]]`. The work is done by the batch's attention
backend, which plans once per forward (gather indices, masks) so each layer only does tensor ops:

- TorchAttentionBackend (CPU, or GPU without Triton): decodes run as one padded, masked SDPA call;
  extends run one SDPA call per request (the causal mask is aligned to the cached prefix).
- TritonAttentionBackend (CUDA): calls nlcli.kernels' decode/extend kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nlcli.engine.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H*D] or [T, H, D]; k, v [T, Hkv*D] or [T, Hkv, D] -> [T, H*D]."""
        T = q.shape[0]
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        return batch.attn_backend.forward(q, k, v, self, batch).reshape(T, self.num_heads * self.head_dim)


@dataclass
class _DecodeGroup:
    token_index: Optional[torch.Tensor]  # which rows of the flat token axis (None: all of them)
    flat_slots: torch.Tensor  # [n * max_len] KV slots, row-major, padding -> 0 (the dummy slot)
    max_len: int
    # [n, 1, 1, max_len] additive float mask (0 attended, -inf padding); None when no row is padded.
    # Additive and built once per forward: a bool mask is converted by SDPA in every layer.
    mask: Optional[torch.Tensor]


@dataclass
class _ExtendSeq:
    start: int
    end: int
    slots: torch.Tensor  # [seq_len]
    mask: Optional[torch.Tensor]  # [extend_len, seq_len] additive, None when plain causal (no prefix)


class TorchAttentionBackend:
    """Portable attention in torch (SDPA); plans per forward in `init_forward_metadata`."""

    def __init__(self, req_to_token_pool, token_to_kv_pool):
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.decode: Optional[_DecodeGroup] = None
        self.extends: list[_ExtendSeq] = []

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        req_to_token = self.req_to_token_pool.req_to_token
        device = batch.input_ids.device
        self.decode, self.extends = None, []
        if batch.forward_mode == ForwardMode.DECODE:
            self.decode = self._plan_decode(req_to_token, batch.req_pool_indices, batch.seq_lens, None,
                                            batch.seq_lens_cpu)
            return
        # Mixed batch: requests adding one token share one batched call; the rest run one by one.
        one, start, rows_cpu = [], 0, None
        kv_dtype = self.token_to_kv_pool.dtype
        for i, (pre, ext) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            if ext == 1 and pre > 0:
                one.append((i, start))
            else:
                if rows_cpu is None:
                    rows_cpu = batch.req_pool_indices.tolist()
                seq = pre + ext
                slots = req_to_token[rows_cpu[i], :seq]
                mask = None
                if pre > 0:  # query j sits at position pre + j: bottom-right aligned causal mask
                    allowed = torch.ones(ext, seq, dtype=torch.bool, device=device).tril(diagonal=pre)
                    mask = torch.zeros(ext, seq, dtype=kv_dtype, device=device)
                    mask.masked_fill_(~allowed, float("-inf"))
                self.extends.append(_ExtendSeq(start, start + ext, slots, mask))
            start += ext
        if one:
            idx = torch.tensor([i for i, _ in one], dtype=torch.int64, device=device)
            tok = torch.tensor([s for _, s in one], dtype=torch.int64, device=device)
            lens_cpu = [batch.seq_lens_cpu[i] for i, _ in one]
            self.decode = self._plan_decode(
                req_to_token, batch.req_pool_indices[idx], batch.seq_lens[idx], tok, lens_cpu
            )

    def _plan_decode(self, req_to_token, rows, seq_lens, token_index, seq_lens_cpu) -> _DecodeGroup:
        max_len = max(seq_lens_cpu)
        slots = req_to_token[rows, :max_len]
        mask = None
        if min(seq_lens_cpu) != max_len:
            valid = torch.arange(max_len, device=rows.device).unsqueeze(0) < seq_lens.unsqueeze(1)
            slots = slots.masked_fill(~valid, 0)
            mask = torch.zeros(valid.shape, dtype=self.token_to_kv_pool.dtype, device=rows.device)
            mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        return _DecodeGroup(token_index, slots.reshape(-1), max_len, mask)

    def forward(self, q, k, v, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        self.token_to_kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        o = None
        if self.decode is not None:
            d = self.decode
            out = self._decode(q if d.token_index is None else q[d.token_index], k_buf, v_buf, layer, d)
            if d.token_index is None:
                return out
            o = torch.empty_like(q)
            o[d.token_index] = out
        if o is None:
            o = torch.empty_like(q)
        gqa = layer.num_heads != layer.num_kv_heads
        for s in self.extends:
            qs = q[s.start : s.end].transpose(0, 1)  # [H, ext, D]
            ks = k_buf.index_select(0, s.slots).transpose(0, 1)  # [Hkv, seq, D]
            vs = v_buf.index_select(0, s.slots).transpose(0, 1)
            out = F.scaled_dot_product_attention(
                qs.to(ks.dtype), ks, vs, attn_mask=s.mask, is_causal=s.mask is None,
                scale=layer.scaling, enable_gqa=gqa,
            )
            o[s.start : s.end] = out.transpose(0, 1).to(q.dtype)
        return o

    @staticmethod
    def _decode(q, k_buf, v_buf, layer: Attention, d: _DecodeGroup) -> torch.Tensor:
        """q [n, H, D] -> [n, H, D]: one query token per request over its padded slots.

        index_select on the flat slot list is several times faster on CPU than advanced indexing
        with a 2-D index. The query heads that share a KV head go in SDPA's query-length axis
        ([n, Hkv, H/Hkv, D]): no mask is causal here, so this is exact and K/V are never repeated
        per query head (what enable_gqa does)."""
        n, hkv, dim = q.shape[0], layer.num_kv_heads, layer.head_dim
        kd = k_buf.index_select(0, d.flat_slots).view(n, d.max_len, hkv, dim).transpose(1, 2)
        vd = v_buf.index_select(0, d.flat_slots).view(n, d.max_len, hkv, dim).transpose(1, 2)
        qg = q.reshape(n, hkv, layer.num_heads // hkv, dim).to(kd.dtype)
        out = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=d.mask, scale=layer.scaling)
        return out.reshape(n, layer.num_heads, dim).to(q.dtype)


class TritonAttentionBackend:
    """CUDA path: the Triton kernels of nlcli.kernels (each with a torch reference)."""

    def __init__(self, req_to_token_pool, token_to_kv_pool, decode_fn, extend_fn):
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.decode_fn = decode_fn
        self.extend_fn = extend_fn

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, q, k, v, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        self.token_to_kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        o = torch.empty_like(q)
        req_to_token = self.req_to_token_pool.req_to_token
        if batch.forward_mode == ForwardMode.DECODE:
            self.decode_fn(q, k_buf, v_buf, o, req_to_token, batch.req_pool_indices, batch.seq_lens, layer.scaling)
        else:
            self.extend_fn(
                q, k_buf, v_buf, o, req_to_token, batch.req_pool_indices,
                batch.prefix_lens, batch.extend_lens, layer.scaling,
            )
        return o


def create_attn_backend(name: str, device: torch.device, req_to_token_pool, token_to_kv_pool):
    """auto: Triton kernels on CUDA when importable, torch otherwise."""
    if device.type == "cuda" and name in ("auto", "triton"):
        try:
            from nlcli.kernels.decode_attention import decode_attention_fwd
            from nlcli.kernels.extend_attention import extend_attention_fwd

            return TritonAttentionBackend(req_to_token_pool, token_to_kv_pool, decode_attention_fwd, extend_attention_fwd)
        except ImportError as e:
            if name == "triton":
                raise RuntimeError(f"--attention-backend triton needs nlcli.kernels: {e}") from e
            logger.warning("Triton attention kernels unavailable (%s); using torch attention", e)
    elif name == "triton":
        raise RuntimeError("--attention-backend triton needs a CUDA device")
    return TorchAttentionBackend(req_to_token_pool, token_to_kv_pool)
