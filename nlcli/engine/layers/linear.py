"""Linear layers that know how checkpoint weights map onto them, ready for tensor parallelism.

- ColumnLinear: output features split across TP ranks (no communication).
- QKVLinear / MergedColumnLinear: several checkpoint matrices (q/k/v, gate/up) fused into one
  matmul, which is markedly faster on CPU for small models than three separate ones.
- RowLinear: input features split across ranks, partial outputs all-reduced.
Each parameter carries a `weight_loader(param, loaded, shard_id=None)` used by the models'
`load_weights`, so full-size checkpoint tensors are sliced for this rank at load time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _tp() -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group; (0, 1) when torch.distributed is not set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not divisible by tensor parallel size {d}")
    return n // d


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
        super().__init__(in_features, _divide(out_features, self.tp_size), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        _copy(param.data, _shard(loaded, 0, self.tp_rank, n, n * self.tp_size))


class MergedColumnLinear(_Linear):
    """Several column-parallel outputs stacked: [shard 0 | shard 1 | ...] per rank."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False):
        self.tp_rank, self.tp_size = _tp()
        self.local_sizes = [_divide(s, self.tp_size) for s in output_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        n = self.local_sizes[shard_id]
        start = sum(self.local_sizes[:shard_id])
        _copy(param.data.narrow(0, start, n), _shard(loaded, 0, self.tp_rank, n, n * self.tp_size))


class QKVLinear(MergedColumnLinear):
    """q, k and v projections in one matmul; shard ids "q", "k", "v"."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        _, tp_size = _tp()
        # With more ranks than KV heads, each rank keeps one (replicated) KV head.
        self.kv_replicas = max(1, tp_size // num_kv_heads) if num_kv_heads < tp_size else 1
        kv = max(num_kv_heads, tp_size) * head_dim
        super().__init__(hidden, [num_heads * head_dim, kv, kv], bias)
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def weight_loader(self, param, loaded, shard_id=None):
        idx = {"q": 0, "k": 1, "v": 2}[shard_id]
        n = self.local_sizes[idx]
        start = sum(self.local_sizes[:idx])
        rank = self.tp_rank if idx == 0 else self.tp_rank // self.kv_replicas
        _copy(param.data.narrow(0, start, n), _shard(loaded, 0, rank, n, self.full_sizes[idx]))


class RowLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.tp_rank, self.tp_size = _tp()
        super().__init__(_divide(in_features, self.tp_size), out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, after the reduce
            _copy(param.data, loaded)
            return
        n = param.shape[1]
        _copy(param.data, _shard(loaded, 1, self.tp_rank, n, n * self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        import torch.distributed as dist

        out = self._matmul(x, None)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabEmbedding(nn.Module):
    """Token embedding table (kept whole on every rank; it is small next to the layers)."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.weight.weight_loader = lambda param, loaded, shard_id=None: _copy(param.data, loaded)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[str] = None) -> None:
    _copy(param.data, loaded)


def _size_mismatch(live: int, loaded: int, dim: int) -> RuntimeError:
    # torch's own wording (what copy_ says), which /update_weights reports verbatim.
    return RuntimeError(
        f"The size of tensor a ({live}) must match the size of tensor b ({loaded}) "
        f"at non-singleton dimension {dim}"
    )


def _shard(loaded: torch.Tensor, dim: int, rank: int, n: int, full: int) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor, after checking the checkpoint's full size: a
    larger checkpoint must never be silently truncated to fit."""
    if loaded.shape[dim] != full:
        raise _size_mismatch(full, loaded.shape[dim], dim)
    return loaded.narrow(dim, rank * n, n)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        if dst.dim() != src.dim():
            raise RuntimeError(f"weight rank mismatch: model {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
        dim = next(i for i, (a, b) in enumerate(zip(dst.shape, src.shape)) if a != b)
        raise _size_mismatch(dst.shape[dim], src.shape[dim], dim)
    dst.copy_(src)
