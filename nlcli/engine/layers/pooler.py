"""Pooler: turns the packed hidden states of an embedding batch into one vector per sequence.

Hidden states arrive packed (`[num_tokens, hidden]`, sequences back to back, as in an extend batch)
with each sequence's length; pooling is done with index ops, never by padding, and in float32 so
bf16 models still produce stable means and norms.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PoolingType(str, enum.Enum):
    MEAN = "mean"  # sentence-transformers' mean of token embeddings (MiniLM, e5, bge-small...)
    CLS = "cls"  # the first token's state (BERT [CLS])
    LAST = "last"  # the last token's state (decoder embedders: gte-Qwen2, e5-mistral)
    MAX = "max"  # element-wise max over the tokens
    MEAN_SQRT_LEN = "mean_sqrt_len"  # sum / sqrt(len), an older sentence-transformers option


@dataclass
class EmbeddingPoolerOutput:
    """One pooled vector per sequence, float32, in batch order."""

    embeddings: torch.Tensor  # [bs, hidden]


def _as_lengths(lengths: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        return lengths.to(device=device, dtype=torch.int64)
    return torch.tensor(list(lengths), dtype=torch.int64, device=device)


def pool(
    hidden_states: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    pooling: PoolingType | str,
) -> torch.Tensor:
    """Pool `hidden_states` `[num_tokens, H]` into `[bs, H]` float32, one row per length."""
    pooling = PoolingType(pooling)
    lens = _as_lengths(lengths, hidden_states.device)
    if int(lens.sum()) != hidden_states.shape[0] or bool((lens <= 0).any()):
        raise ValueError(
            f"pooling needs positive lengths summing to {hidden_states.shape[0]} tokens, "
            f"got {lens.tolist()}"
        )
    h = hidden_states.float()
    ends = torch.cumsum(lens, 0)
    if pooling is PoolingType.CLS:
        return h[ends - lens]
    if pooling is PoolingType.LAST:
        return h[ends - 1]
    bs, hidden = lens.shape[0], h.shape[1]
    seq_ids = torch.repeat_interleave(torch.arange(bs, device=h.device), lens)
    if pooling is PoolingType.MAX:
        index = seq_ids[:, None].expand(-1, hidden)
        out = h.new_empty(bs, hidden)
        return out.scatter_reduce_(0, index, h, reduce="amax", include_self=False)
    sums = h.new_zeros(bs, hidden).index_add_(0, seq_ids, h)
    denom = lens.to(h.dtype)
    if pooling is PoolingType.MEAN_SQRT_LEN:
        denom = denom.sqrt()
    return sums / denom[:, None]


class Pooler(nn.Module):
    """Pooling plus optional L2 normalisation, as a model's last module."""

    def __init__(self, pooling: PoolingType | str, normalize: bool):
        super().__init__()
        self.pooling = PoolingType(pooling)
        self.normalize = normalize

    def forward(
        self, hidden_states: torch.Tensor, lengths: Sequence[int] | torch.Tensor
    ) -> EmbeddingPoolerOutput:
        pooled = pool(hidden_states, lengths, self.pooling)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return EmbeddingPoolerOutput(embeddings=pooled)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling.value}, normalize={self.normalize}"
