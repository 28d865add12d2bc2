"""Linear layers that know how checkpoint weights map onto them, ready for tensor parallelism.

- ColumnLinear: output features split across TP ranks (no communication).
- QKVLinear / MergedColumnLinear: several checkpoint matrices (q/k/v, gate/up) fused into one
  matmul, which is markedly faster on CPU for small models than three separate ones.
- RowLinear: input features split across ranks, partial outputs all-reduced.
- VocabEmbedding: vocabulary rows split across ranks (embedding all-reduced; as lm_head its
  logits are gathered by the LogitsProcessor).
Splits are contiguous and may be uneven (distributed/split.py): attention splits by KV groups,
so 9 heads over 3 KV heads run on 2 ranks.
Each parameter carries a `weight_loader(param, loaded, shard_id=None)` used by the models'
`load_weights`, so full-size checkpoint tensors are sliced for this rank at load time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nlcli.engine.distributed.parallel_state import tp_rank_size as _tp
from nlcli.engine.distributed.split import attention_split, split_range


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        self.method = None  # a layers/quantization method once installed; None: F.linear

    def set_method(self, method) -> None:
        self.method = method

    def _matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, self.weight, bias) if self.method is None else self.method(x, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy(param.data, loaded)


class ColumnLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.tp_rank, self.tp_size = _tp()
        self.out_start, n = split_range(out_features, self.tp_size, self.tp_rank)
        self.full_out = out_features
        super().__init__(in_features, n, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        _copy(param.data, _shard(loaded, 0, self.out_start, param.shape[0], self.full_out))


class MergedColumnLinear(_Linear):
    """Several column-parallel outputs stacked: [shard 0 | shard 1 | ...] per rank. `ranges`
    (start, count) per output overrides the even split (QKVLinear's head split)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 ranges: Optional[Sequence[tuple[int, int]]] = None):
        self.tp_rank, self.tp_size = _tp()
        self.full_sizes = list(output_sizes)
        self.ranges = list(ranges or (split_range(s, self.tp_size, self.tp_rank) for s in output_sizes))
        self.local_sizes = [n for _, n in self.ranges]
        super().__init__(in_features, sum(self.local_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        idx = self._index(shard_id)
        (src, n), start = self.ranges[idx], sum(self.local_sizes[:idx])
        _copy(param.data.narrow(0, start, n), _shard(loaded, 0, src, n, self.full_sizes[idx]))

    def _index(self, shard_id) -> int:
        return shard_id


class QKVLinear(MergedColumnLinear):
    """q, k and v projections in one matmul; shard ids "q", "k", "v"."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        rank, size = _tp()
        # This rank's heads (distributed/split.py); `split` also sizes attention and o_proj.
        self.split = s = attention_split(num_heads, num_kv_heads, rank, size)
        kv = (s.kv_start * head_dim, s.kv_count * head_dim)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, ranges=[(s.q_start * head_dim, s.q_count * head_dim), kv, kv])

    def _index(self, shard_id) -> int:
        return {"q": 0, "k": 1, "v": 2}[shard_id]


class RowLinear(_Linear):
    """`in_range` (start, count) overrides the even split of the input (o_proj follows the
    query heads of QKVLinear.split)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 in_range: Optional[tuple[int, int]] = None):
        self.tp_rank, self.tp_size = _tp()
        self.in_start, n = in_range or split_range(in_features, self.tp_size, self.tp_rank)
        self.full_in = in_features
        super().__init__(n, out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, after the reduce
            _copy(param.data, loaded)
            return
        _copy(param.data, _shard(loaded, 1, self.in_start, param.shape[1], self.full_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        import torch.distributed as dist

        out = self._matmul(x, None)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabEmbedding(nn.Module):
    """Token embedding table, vocab-parallel: each rank holds rows [vocab_start, + count) of it.
    As an embedding, ids outside the slice give zeros and the all-reduce fills them in; as the
    lm_head, `vocab_counts` tells the LogitsProcessor how to gather the logits."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.tp_rank, self.tp_size = _tp()
        self.vocab_size = vocab_size
        self.vocab_start, n = split_range(vocab_size, self.tp_size, self.tp_rank)
        self.vocab_counts = [split_range(vocab_size, self.tp_size, r)[1] for r in range(self.tp_size)]
        self.weight = nn.Parameter(torch.empty(n, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        _copy(param.data, _shard(loaded, 0, self.vocab_start, param.shape[0], self.vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        import torch.distributed as dist

        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[str] = None) -> None:
    _copy(param.data, loaded)


def _size_mismatch(live: int, loaded: int, dim: int) -> RuntimeError:
    # torch's own wording (what copy_ says), which /update_weights reports verbatim.
    return RuntimeError(
        f"The size of tensor a ({live}) must match the size of tensor b ({loaded}) "
        f"at non-singleton dimension {dim}"
    )


def _shard(loaded: torch.Tensor, dim: int, start: int, n: int, full: int) -> torch.Tensor:
    """This rank's slice [start, start + n) of a checkpoint tensor, after checking the
    checkpoint's full size: a larger checkpoint must never be silently truncated to fit."""
    if loaded.shape[dim] != full:
        raise _size_mismatch(full, loaded.shape[dim], dim)
    return loaded.narrow(dim, start, n)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        if dst.dim() != src.dim():
            raise RuntimeError(f"weight rank mismatch: model {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
        dim = next(i for i, (a, b) in enumerate(zip(dst.shape, src.shape)) if a != b)
        raise _size_mismatch(dst.shape[dim], src.shape[dim], dim)
    dst.copy_(src)
