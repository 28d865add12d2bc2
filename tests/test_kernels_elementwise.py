"""KV store and SiLU-and-mul kernels: Triton vs torch reference (vs plain torch for the latter).

Same interpreter arrangement as the attention tests (tests/kernel_harness.py): TRITON_INTERPRET=1
without CUDA, a fresh process when this one already imported Triton compiled-only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_harness import (  # noqa: F401 (interpret_while_running: autouse fixture)
    COMPILED_ONLY,
    DEVICE,
    assert_passes_in_fresh_interpreter,
    interpret_while_running,
    load_kernels,
    needs_gpu,
)

_mods = load_kernels(["nlcli.kernels.kv_store", "nlcli.kernels.activation"])
IN_PROCESS = _mods is not None
if IN_PROCESS:
    store_kv_fwd, store_kv_ref = _mods[0].store_kv_fwd, _mods[0].store_kv_ref
    silu_and_mul_fwd, silu_and_mul_ref = _mods[1].silu_and_mul_fwd, _mods[1].silu_and_mul_ref

in_process = pytest.mark.skipif(not IN_PROCESS, reason=COMPILED_ONLY)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_elementwise_kernels_in_fresh_interpreter_process():
    assert_passes_in_fresh_interpreter(__file__)


def _kv_case(num_tokens, num_kv_heads, head_dim, dtype, seed, slots=40):
    """Pool buffers plus k/v sliced out of a fused qkv projection (strided rows, as the engine has),
    all in the pool's dtype as in the engine (the interpreter rounds float32 -> bfloat16 its own way)."""
    gen = torch.Generator().manual_seed(seed)
    k_buf = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_buf = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    width = num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, 3 * width, generator=gen).to(dtype).to(DEVICE)
    k = qkv[:, width: 2 * width].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * width:].view(num_tokens, num_kv_heads, head_dim)
    loc = (torch.randperm(slots - 1, generator=gen)[:num_tokens] + 1).to(DEVICE)
    return k_buf, v_buf, loc, k, v


@in_process
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim", [(1, 2, 64), (7, 3, 80), (12, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference(num_tokens, num_kv_heads, head_dim, dtype):
    k_buf, v_buf, loc, k, v = _kv_case(num_tokens, num_kv_heads, head_dim, dtype, seed=num_tokens)
    ref_k, ref_v = k_buf.clone(), v_buf.clone()
    store_kv_fwd(k_buf, v_buf, loc, k, v)
    store_kv_ref(ref_k, ref_v, loc, k, v)
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v)
    assert torch.equal(k_buf[loc], k)  # and the reference itself is right


@in_process
def test_store_kv_padding_rows_only_touch_the_dummy_slot():
    # A CUDA graph's padding tokens all write slot 0; every other slot must stay as it was.
    k_buf, v_buf, loc, k, v = _kv_case(5, 2, 64, torch.float32, seed=3)
    loc[3:] = 0
    before_k = k_buf.clone()
    store_kv_fwd(k_buf, v_buf, loc, k, v)
    untouched = torch.ones(k_buf.shape[0], dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert torch.equal(k_buf[untouched.to(DEVICE)], before_k[untouched.to(DEVICE)])
    assert torch.equal(k_buf[loc[:3]], k[:3])


@in_process
@pytest.mark.parametrize("rows,d", [(1, 64), (5, 1536), (3, 100)])  # 1536 > one block; 100 odd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(rows, d, dtype):
    gen = torch.Generator().manual_seed(rows * d)
    x = (3 * torch.randn(rows, 2 * d, generator=gen)).to(dtype).to(DEVICE)
    out, ref = silu_and_mul_fwd(x), silu_and_mul_ref(x)
    assert out.shape == (rows, d) and out.dtype == dtype
    # bfloat16: within two units in the last place (the interpreter truncates where GPUs round).
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (2e-2, 1e-2)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(ref, F.silu(x[:, :d]) * x[:, d:])


@pytest.mark.gpu
@needs_gpu
def test_model_shapes_bf16_on_gpu():
    k_buf, v_buf, loc, k, v = _kv_case(300, 8, 128, torch.bfloat16, seed=9, slots=400)
    ref_k, ref_v = k_buf.clone(), v_buf.clone()
    store_kv_fwd(k_buf, v_buf, loc, k, v)
    store_kv_ref(ref_k, ref_v, loc, k, v)
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v)
    x = torch.randn(37, 2 * 8192, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul_fwd(x), silu_and_mul_ref(x), rtol=1e-2, atol=1e-2)
