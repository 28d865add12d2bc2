"""TritonAttentionBackend: the CUDA path, on the Triton kernels of nlcli.kernels.

`plan(batch)` runs once per forward, on the host lists the scheduler already has (`*_cpu`), and
returns a `TritonAttentionPlan` that the ForwardBatch carries: the longest extend (sizes the extend
kernel's grid), the packed-query start offsets (one device cumsum), and the decode kernel's number
of KV splits. Layers then only launch kernels: no `.item()`, `.tolist()` or other device sync, so a
decode forward can be captured in a CUDA graph (`plan(batch, for_graph=True)` keeps the split count
independent of the sequence lengths, which change between replays).

The kernels arrive as a `TritonKernels` set, so tests can run this exact code path on the CPU with
each kernel's torch reference (same signatures) in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from nlcli.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from nlcli.engine.layers.attention import Attention

MAX_KV_SPLITS = 16
_DEFAULT_NUM_SMS = 132  # an H100's; only used when the device cannot be asked


@dataclass(frozen=True)
class TritonKernels:
    decode: Callable  # decode_attention_fwd's signature
    extend: Callable  # extend_attention_fwd's signature
    store_kv: Callable  # store_kv_fwd(k_buffer, v_buffer, loc, k, v)


def load_triton_kernels() -> TritonKernels:
    """The compiled kernels (raises ImportError without Triton)."""
    from nlcli.kernels.decode_attention import decode_attention_fwd
    from nlcli.kernels.extend_attention import extend_attention_fwd
    from nlcli.kernels.kv_store import store_kv_fwd

    return TritonKernels(decode_attention_fwd, extend_attention_fwd, store_kv_fwd)


def reference_kernels() -> TritonKernels:
    """Each kernel's torch reference: the same code path on any device (tests, debugging)."""
    from nlcli.kernels.decode_attention import decode_attention_ref
    from nlcli.kernels.extend_attention import extend_attention_ref
    from nlcli.kernels.kv_store import store_kv_ref

    return TritonKernels(decode_attention_ref, extend_attention_ref, store_kv_ref)


@dataclass(frozen=True)
class TritonAttentionPlan:
    decode: bool  # every request adds one token: the split-KV decode kernel
    max_extend_len: int  # longest extend_len (grid of the extend kernel)
    qo_start_loc: Optional[torch.Tensor]  # [bs] where each request's queries start (extend only)
    num_kv_splits: int  # decode kernel's KV splits per request


def decode_kv_splits(bs: int, num_kv_heads: int, num_sms: int, max_seq_len: Optional[int] = None) -> int:
    """KV splits so a small decode batch still fills the GPU: about two stage-1 programs per SM
    (one program serves one KV head of one request per split), a power of two so few kernel
    variants ever compile, and no more splits than 64-key blocks when the lengths are known."""
    want = -(-2 * num_sms // max(bs * num_kv_heads, 1))
    if max_seq_len is not None:
        want = min(want, -(-max_seq_len // 64))
    splits = 1
    while splits * 2 <= min(want, MAX_KV_SPLITS):
        splits *= 2
    return splits


class TritonAttentionBackend:
    """Paged attention through Triton kernels; stateless between forwards (the plan is the batch's)."""

    def __init__(self, req_to_token_pool, token_to_kv_pool, kernels: TritonKernels,
                 num_sms: Optional[int] = None):
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.kernels = kernels
        device = token_to_kv_pool.device
        if num_sms is None and device.type == "cuda":
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.num_sms = num_sms or _DEFAULT_NUM_SMS

    def plan(self, batch: ForwardBatch, for_graph: bool = False) -> TritonAttentionPlan:
        """Once per forward, from host lists only; `for_graph`: valid for any sequence lengths."""
        num_kv_heads = self.token_to_kv_pool.head_num
        if batch.forward_mode == ForwardMode.DECODE:
            max_seq = None if for_graph else max(batch.seq_lens_cpu, default=1)
            splits = decode_kv_splits(batch.batch_size, num_kv_heads, self.num_sms, max_seq)
            return TritonAttentionPlan(True, 1, None, splits)
        if for_graph:
            raise ValueError("only decode batches are captured in CUDA graphs")
        qo_start_loc = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
        return TritonAttentionPlan(False, max(batch.extend_lens_cpu), qo_start_loc, 1)

    def forward(self, q, k, v, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        plan: TritonAttentionPlan = batch.attn_plan
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self.kernels.store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)
        o = torch.empty_like(q)
        req_to_token = self.req_to_token_pool.req_to_token
        if plan.decode:
            self.kernels.decode(
                q, k_buf, v_buf, o, req_to_token, batch.req_pool_indices, batch.seq_lens,
                layer.scaling, num_kv_splits=plan.num_kv_splits,
            )
        else:
            self.kernels.extend(
                q, k_buf, v_buf, o, req_to_token, batch.req_pool_indices, batch.prefix_lens,
                batch.extend_lens, layer.scaling, max_extend_len=plan.max_extend_len,
                qo_start_loc=plan.qo_start_loc,
            )
        return o
