"""TorchAttentionBackend against a naive reference: every request's queries attend over its own
slots (cached prefix + new tokens), causally by absolute position, in float64 with plain
softmax. Covers extends with and without a cached prefix, GQA and MHA, a one-token extend, and a
mixed batch where decodes share the batched decode call, a lone decode read in place from its
slot run; float32 and bfloat16 pools; decodes on nl's C kernel (the CPU default) and on SDPA (where
no C compiler is found, and GPUs without Triton)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.attention import TorchAttentionBackend
from nlcli.engine.mem_cache.pool import ReqToTokenPool, TokenToKVPool

D = 16


def naive(q, k, v, scale):
    """q [ext, H, D] at positions pre..pre+ext-1; k, v [seq, Hkv, D]: float64 reference."""
    ext, h = q.shape[0], q.shape[1]
    seq, hkv = k.shape[0], k.shape[1]
    pre = seq - ext
    group = h // hkv
    out = torch.empty(ext, h, D, dtype=torch.float64)
    for j in range(ext):
        for head in range(h):
            kk, vv = k[: pre + j + 1, head // group].double(), v[: pre + j + 1, head // group].double()
            w = torch.softmax(kk @ q[j, head].double() * scale, dim=0)
            out[j, head] = w @ vv
    return out


# (prefix_len, extend_len): a fresh prompt, extends on a prefix, decodes, a 1-token prompt.
SHAPES = [(0, 37), (23, 19), (40, 1), (0, 1), (9, 1), (64, 65)]


def run_layer(shapes, dtype, heads, kv_heads, contiguous=False, c_decode=None):
    """One attention layer's forward over a batch of `shapes` with random q/k/v and scattered
    slots (ascending ones with `contiguous`); `c_decode` False forces SDPA for decodes. Returns
    (output, q, per-request k, per-request v, scale)."""
    gen = torch.Generator().manual_seed(0)
    pool = TokenToKVPool(512, dtype, kv_heads, D, 1)
    rows = ReqToTokenPool(len(shapes), 256)
    layer = SimpleNamespace(layer_id=0, num_heads=heads, num_kv_heads=kv_heads, head_dim=D,
                            scaling=1 / math.sqrt(D))
    # Scattered slots, as the allocator hands them out after churn.
    perm = (torch.arange(511) + 1 if contiguous else torch.randperm(511, generator=gen) + 1).tolist()
    ks, vs, new_loc, next_slot = [], [], [], 0
    for i, (pre, ext) in enumerate(shapes):
        slots = torch.tensor(perm[next_slot: next_slot + pre + ext])
        next_slot += pre + ext
        rows.req_to_token[i, : pre + ext] = slots
        k = torch.randn(pre + ext, kv_heads, D, generator=gen).to(dtype)
        v = torch.randn(pre + ext, kv_heads, D, generator=gen).to(dtype)
        pool.set_kv_buffer(0, slots[:pre], k[:pre], v[:pre])  # the cached prefix
        ks.append(k)
        vs.append(v)
        new_loc.append(slots[pre:])
    q = torch.randn(sum(e for _, e in shapes), heads, D, generator=gen).to(dtype)
    batch = ForwardBatch.create([[0] * e for _, e in shapes], [p for p, _ in shapes],
                                list(range(len(shapes))), torch.cat(new_loc))
    backend = TorchAttentionBackend(rows, pool)
    if c_decode is not None:
        backend.c_decode = backend.c_decode and c_decode
    batch.plan_attention(backend)
    if contiguous and len(shapes) == 1 and shapes[0][1] == 1:
        d = batch.attn_plan.decode  # read in place: by the C kernel, or SDPA on a view, no gather
        assert d.flat_slots is None if backend.c_decode else d.run_start == 1
    k_new = torch.cat([k[p:] for k, (p, _) in zip(ks, shapes)])
    v_new = torch.cat([v[p:] for v, (p, _) in zip(vs, shapes)])
    return backend.forward(q, k_new, v_new, layer, batch), q, ks, vs, layer.scaling


@pytest.mark.parametrize("c_decode", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_paged_attention_equals_naive(dtype, tol, heads, kv_heads, c_decode):
    got, q, ks, vs, scale = run_layer(SHAPES, dtype, heads, kv_heads, c_decode=c_decode)
    start = 0
    for k, v, (pre, ext) in zip(ks, vs, SHAPES):
        want = naive(q[start: start + ext], k, v, scale)
        err = (got[start: start + ext].double() - want).abs().max() / want.abs().max()
        assert err < tol, (pre, ext, float(err))
        start += ext


@pytest.mark.parametrize("c_decode", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pre", [0, 1, 40])
def test_decode_reads_a_lone_requests_run_in_place(dtype, tol, pre, c_decode):
    got, q, ks, vs, scale = run_layer([(pre, 1)], dtype, 4, 2, contiguous=True, c_decode=c_decode)
    want = naive(q, ks[0], vs[0], scale)
    assert (got.double() - want).abs().max() / want.abs().max() < tol


def test_extends_run_on_the_fused_cpu_kernel():
    # 3-D inputs would silently take SDPA's unfused reference path (several times slower).
    from torch.profiler import profile

    with profile() as prof:
        run_layer([(0, 40), (30, 20)], torch.float32, 4, 2)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
