"""Attention over the paged KV pool, and the choice of attention backend.

`Attention` is what models call: (q, k, v) of the batch's new tokens in, attention output out. It
writes the new K/V into the pool at `out_cache_loc` and attends, for request i, over the slots
`req_to_token[req_pool_indices[i], :seq_lens[i]]`. The work is done by the batch's attention
backend. A backend's `plan(batch)` runs once per forward (gather indices, masks, kernel launch
sizes) and the ForwardBatch carries the plan (`batch.attn_plan`); every layer reads it from there,
so backends keep no per-forward state:

- TorchAttentionBackend (layers/torch_attention.py): CPU, or GPU without Triton.
- TritonAttentionBackend (layers/triton_attention.py): CUDA, on nlcli.kernels' Triton kernels.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.torch_attention import TorchAttentionBackend, TorchAttentionPlan
from nlcli.engine.layers.triton_attention import TritonAttentionBackend, load_triton_kernels

__all__ = ["Attention", "TorchAttentionBackend", "TorchAttentionPlan", "TritonAttentionBackend",
           "create_attn_backend"]

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


def create_attn_backend(name: str, device: torch.device, req_to_token_pool, token_to_kv_pool):
    """auto: Triton kernels on CUDA when importable, torch otherwise."""
    if device.type == "cuda" and name in ("auto", "triton"):
        try:
            kernels = load_triton_kernels()
        except ImportError as e:
            if name == "triton":
                raise RuntimeError(f"--attention-backend triton needs nlcli.kernels: {e}") from e
            logger.warning("Triton attention kernels unavailable (%s); using torch attention", e)
        else:
            return TritonAttentionBackend(req_to_token_pool, token_to_kv_pool, kernels)
    elif name == "triton":
        raise RuntimeError("--attention-backend triton needs a CUDA device")
    return TorchAttentionBackend(req_to_token_pool, token_to_kv_pool)
