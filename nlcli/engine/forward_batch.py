"""ForwardBatch: the flat tensors one model forward needs, and how a scheduler builds them.

This is the contract between the scheduler (which owns requests, slots and the radix cache) and the
model runner (which owns weights and the KV buffers). The scheduler has already:
  * given each request a row in `ReqToTokenPool` (`req_pool_indices`),
  * allocated `out_cache_loc` slots for every new token and written them into
    `req_to_token[row, prefix_len:seq_len]` (the cached prefix slots are already in
    `req_to_token[row, :prefix_len]`).
The runner then writes each layer's new K/V at `out_cache_loc` and attends, for request i, over
`req_to_token[req_pool_indices[i], :seq_lens[i]]`. Models never see paging.

One shape serves every mode: each request contributes `extend_len` new tokens on top of
`prefix_len` cached ones. Decode is the case where every `extend_len` is 1; a mixed batch (some
requests prefilling, some decoding) is simply an EXTEND batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill, possibly on top of a cached prefix; may mix in decodes
    DECODE = "decode"  # every request adds exactly one token


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64, the new tokens of every request, concatenated
    positions: torch.Tensor  # [num_tokens] int64, absolute positions of those tokens
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [bs] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [bs] int64, prefix_len + extend_len
    prefix_lens: torch.Tensor  # [bs] int64, tokens already in the KV cache
    extend_lens: torch.Tensor  # [bs] int64, new tokens this forward
    # Host copies, so Python-side planning never syncs with the device.
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    # When True the runner returns logits for every new token (prompt logprobs, scoring);
    # otherwise only for the last new token of each request.
    return_all_logits: bool = False
    # Set by `plan_attention` (the model runner calls it): the attention backend every layer calls,
    # and its plan for this forward (gather indices, kernel launch sizes), computed once and shared
    # by every layer so no layer plans or syncs with the device.
    attn_backend: Optional[Any] = None
    attn_plan: Optional[Any] = None
    # [num_tokens] int64 segment ids, set only for cross-encoder (query, document) pairs.
    token_type_ids: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def plan_attention(self, backend: Any) -> None:
        """Attach `backend` and its plan for this batch (once per forward)."""
        self.attn_backend = backend
        self.attn_plan = backend.plan(self)

    @classmethod
    def create(
        cls,
        input_ids: Sequence[Sequence[int]],
        prefix_lens: Sequence[int],
        req_pool_indices: Sequence[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str = "cpu",
        return_all_logits: bool = False,
    ) -> "ForwardBatch":
        """Build a batch from each request's new token ids and its cached prefix length."""
        extend_lens = [len(ids) for ids in input_ids]
        if any(n == 0 for n in extend_lens):
            raise ValueError("every request in a forward batch needs at least one new token")
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        mode = ForwardMode.DECODE if all(e == 1 for e in extend_lens) else ForwardMode.EXTEND
        flat = [t for ids in input_ids for t in ids]
        positions = [p for pre, e in zip(prefix_lens, extend_lens) for p in range(pre, pre + e)]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            forward_mode=mode,
            batch_size=len(extend_lens),
            input_ids=as_long(flat),
            positions=as_long(positions),
            out_cache_loc=out_cache_loc.to(device=device, dtype=torch.int64),
            req_pool_indices=as_long(list(req_pool_indices)),
            seq_lens=as_long(seq_lens),
            prefix_lens=as_long(list(prefix_lens)),
            extend_lens=as_long(extend_lens),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=extend_lens,
            return_all_logits=return_all_logits,
        )


@dataclass
class LogitsOutput:
    """What one forward returns: float32 logits, next-token rows first."""

    next_token_logits: torch.Tensor  # [bs, vocab], at each request's last new token
    all_logits: Optional[torch.Tensor] = None  # [num_tokens, vocab] when return_all_logits
