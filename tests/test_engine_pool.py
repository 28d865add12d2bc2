"""KV pools and their sizing: allocator bookkeeping, request rows, the dummy slot, memory budget."""

from __future__ import annotations

import pytest
import torch

from nlcli.engine.mem_cache.pool import (
    ReqToTokenPool,
    TokenToKVPool,
    TokenToKVPoolAllocator,
    profile_max_num_tokens,
)
from tests.tiny_models import make_runner


def test_allocator_hands_out_each_slot_once_and_takes_them_back():
    alloc = TokenToKVPoolAllocator(10)
    a, b = alloc.alloc(4), alloc.alloc(6)
    assert alloc.alloc(1) is None and alloc.available_size() == 0
    got = torch.cat([a, b]).tolist()
    assert sorted(got) == list(range(1, 11))  # slot 0 is the dummy, never handed out
    alloc.free(a)
    assert alloc.available_size() == 4 and alloc.alloc(5) is None
    alloc.free(b)
    assert alloc.available_size() == alloc.size


def test_req_to_token_rows():
    pool = ReqToTokenPool(3, 16)
    rows = pool.alloc(2)
    assert len(set(rows)) == 2 and pool.alloc(2) is None
    pool.free(rows)
    assert pool.available_size() == 3
    assert pool.req_to_token.shape == (3, 16) and pool.req_to_token.dtype == torch.int64


def test_kv_pool_layout_and_dummy_slot():
    pool = TokenToKVPool(8, torch.float32, head_num=2, head_dim=4, layer_num=3)
    assert len(pool.k_buffer) == 3 and pool.k_buffer[0].shape == (9, 2, 4)
    assert torch.all(pool.k_buffer[2][0] == 0) and torch.all(pool.v_buffer[1][0] == 0)
    k = torch.randn(2, 2, 4)
    pool.set_kv_buffer(1, torch.tensor([3, 5]), k, -k)
    assert torch.equal(pool.get_key_buffer(1)[5], k[1]) and torch.equal(pool.get_value_buffer(1)[3], -k[0])


def test_pool_sized_from_memory_fraction(tiny_model_dir):
    per_token = TokenToKVPool.bytes_per_token(torch.float32, 2, 16, 2)
    assert per_token == 2 * 2 * 2 * 16 * 4
    assert profile_max_num_tokens(10_000_000, 1_000_000, 0.5, per_token) == 4_000_000 // per_token
    with pytest.raises(RuntimeError, match="mem-fraction-static"):
        profile_max_num_tokens(1_000_000, 900_000, 0.5, per_token)
    runner = make_runner(tiny_model_dir("llama"), max_total_tokens=None, mem_fraction_static=0.002)
    assert runner.max_total_num_tokens > 0
    assert runner.token_to_kv_pool_allocator.size == runner.max_total_num_tokens
    assert runner.token_to_kv_pool.k_buffer[0].shape[0] == runner.max_total_num_tokens + 1


def test_auto_dtype_on_cpu_is_justified():
    from nlcli.engine.model_executor.device import resolve_dtype

    dtype, why = resolve_dtype("auto", torch.device("cpu"))
    assert dtype in (torch.float32, torch.bfloat16) and why.startswith("auto")
    if dtype == torch.bfloat16:  # only chosen where the CPU computes bfloat16 natively
        assert torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
