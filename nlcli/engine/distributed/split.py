"""How tensor-parallel work splits across ranks, unevenly when it must.

A dimension of n splits into contiguous ranges, the first `n % size` ranks taking one more.
Attention splits by KV groups: each rank owns whole KV heads with their query heads, so SmolLM2
(9 query heads, 3 KV heads) runs on 2 ranks as {KV 0, 1; 6 q heads} and {KV 2; 3 q heads}. With
fewer KV heads than ranks, ranks share (replicate) a KV head and split its query heads.
"""

from __future__ import annotations

from typing import NamedTuple


class HeadSplit(NamedTuple):
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of n items."""
    base, extra = divmod(n, size)
    return rank * base + min(rank, extra), base + (rank < extra)


def attention_split(num_heads: int, num_kv_heads: int, rank: int, size: int) -> HeadSplit:
    """The query and KV heads `rank` computes (see the module docstring)."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv_start, kv_count = split_range(num_kv_heads, size, rank)
        return HeadSplit(kv_start * group, kv_count * group, kv_start, kv_count)
    head = rank * num_kv_heads // size
    sharers = [r for r in range(size) if r * num_kv_heads // size == head]
    if group < len(sharers):
        raise ValueError(f"--tp-size {size} exceeds what {num_heads} attention heads over "
                         f"{num_kv_heads} KV heads can split across")
    start, count = split_range(group, len(sharers), sharers.index(rank))
    return HeadSplit(head * group + start, count, head, 1)
