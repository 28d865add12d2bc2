"""Host-side helpers shared by the Triton attention wrappers (launch parameters, input checks)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 callers want fp32 answers (tests compare tightly); tf32 would drop ~3 decimal digits.
    # 16-bit inputs take the backend default (not every backend accepts "tf32" by name).
    return "ieee" if dtype == torch.float32 else None


def heads_per_program(kv_group: int, block_h: int) -> int:
    """Query heads one decode program handles: a divisor of kv_group, at most block_h.

    A divisor keeps every head of a program on the same KV head, so K/V is read once per program.
    """
    for n in range(min(kv_group, block_h), 0, -1):
        if kv_group % n == 0:
            return n
    return 1


def kv_group_of(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, o: torch.Tensor
) -> int:
    """Query heads per KV head (q/o `[tokens, H, D]`, buffers `[slots, Hkv, D]`).

    Also checks what the kernels' pointer arithmetic assumes: unit stride along head_dim.
    """
    num_heads, num_kv_heads = q.shape[1], k_buffer.shape[1]
    kv_group = num_heads // num_kv_heads
    assert num_heads == kv_group * num_kv_heads, "H must be a multiple of Hkv"
    assert q.stride(-1) == 1 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1
    assert o.stride(-1) == 1
    return kv_group


def lens_on(values: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """An integer tensor on `device` (callers may hand over host lists for tiny batches)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, non_blocking=True)
    return torch.tensor(list(values), dtype=torch.int64, device=device)
