"""KV memory: ReqToTokenPool (request row -> slot indices), TokenToKVPool (slot -> per-layer K and
V) and TokenToKVPoolAllocator (the free list of slots), plus sizing the pool from free memory.

Slot 0 of every K/V buffer is a dummy: padded gathers and padding writes point at it, so it is kept
finite (zeroed) and never handed out. The allocator owns slots 1..size.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)


class ReqToTokenPool:
    """One row per running request; row r, column i holds the KV slot of that request's token i."""

    def __init__(self, size: int, max_context_len: int, device: Union[str, torch.device] = "cpu"):
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self.free_rows: list[int] = list(range(size))

    def alloc(self, n: int = 1) -> Optional[list[int]]:
        if n > len(self.free_rows):
            return None
        rows, self.free_rows = self.free_rows[:n], self.free_rows[n:]
        return rows

    def free(self, rows: Union[int, Sequence[int]]) -> None:
        if isinstance(rows, int):
            rows = [rows]
        self.free_rows.extend(int(r) for r in rows)

    def available_size(self) -> int:
        return len(self.free_rows)

    def clear(self) -> None:
        self.free_rows = list(range(self.size))


class TokenToKVPool:
    """Per-layer K and V buffers of shape [size + 1, num_kv_heads, head_dim]."""

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: Union[str, torch.device] = "cpu",
    ):
        self.size = size
        self.dtype = dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        shape = (size + 1, head_num, head_dim)
        # torch.empty: on CPU the OS commits pages only when written, so a large pool costs what
        # is used; only the dummy slot must be finite up front.
        self.k_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        for buf in self.k_buffer + self.v_buffer:
            buf[0].zero_()

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int) -> int:
        return 2 * layer_num * head_num * head_dim * torch.empty((), dtype=dtype).element_size()

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v


class TokenToKVPoolAllocator:
    """Free list of KV slots 1..size. alloc(n) returns an int64 tensor of n slots, or None."""

    def __init__(self, size: int, device: Union[str, torch.device] = "cpu"):
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> Optional[torch.Tensor]:
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        slots = slots.to(device=self.device, dtype=torch.int64).flatten()
        self.free_slots = torch.cat([self.free_slots, slots])


def available_memory_bytes(device: torch.device) -> int:
    """Free memory now: torch.cuda.mem_get_info on GPU, MemAvailable on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def profile_max_num_tokens(
    free_bytes_before_load: int,
    weight_bytes: int,
    mem_fraction_static: float,
    bytes_per_token: int,
) -> int:
    """KV pool size: the static fraction of what was free before loading, minus the weights."""
    budget = int(free_bytes_before_load * mem_fraction_static) - weight_bytes
    tokens = budget // max(bytes_per_token, 1)
    if tokens <= 0:
        raise RuntimeError(
            f"no memory left for the KV cache: {free_bytes_before_load / 2**30:.2f} GiB free x "
            f"mem_fraction_static={mem_fraction_static} is less than the weights "
            f"({weight_bytes / 2**30:.2f} GiB); raise --mem-fraction-static or set --max-total-tokens"
        )
    return int(tokens)
