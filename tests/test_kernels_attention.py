"""Paged attention kernels (decode, extend): Triton vs torch reference vs dense causal attention.

With CUDA the kernels run natively, plus the `gpu`-marked tests (bf16/fp16 at model shapes, CUDA
graph capture). Without CUDA they run under TRITON_INTERPRET=1, which must be set before
`triton.language` is imported: its own helpers (tl.max, tl.cdiv) are decorated at import. If some
earlier module already imported it compiled-only (torch._dynamo does), these tests re-run this file
in a fresh interpreter process instead of failing on a stale import (tests/kernel_harness.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_harness import (  # noqa: F401 (interpret_while_running: autouse fixture)
    COMPILED_ONLY,
    DEVICE,
    assert_passes_in_fresh_interpreter,
    interpret_while_running,
    load_kernels,
    needs_gpu,
)

_mods = load_kernels(["nlcli.kernels.decode_attention", "nlcli.kernels.extend_attention"])
IN_PROCESS = _mods is not None
if IN_PROCESS:
    decode_mod, extend_mod = _mods
    decode_attention_fwd = decode_mod.decode_attention_fwd
    decode_attention_ref = decode_mod.decode_attention_ref
    extend_attention_fwd = extend_mod.extend_attention_fwd
    extend_attention_ref = extend_mod.extend_attention_ref

in_process = pytest.mark.skipif(not IN_PROCESS, reason=COMPILED_ONLY)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_fresh_interpreter_process():
    assert_passes_in_fresh_interpreter(__file__)


class Paged:
    """Random per-request K/V scattered into a shuffled slot pool, plus the dense originals."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, seed, dtype=torch.float32, pool_rows=6):
        gen = torch.Generator().manual_seed(seed)
        total = sum(seq_lens)
        num_slots = total + 9  # spare slots that belong to nobody
        self.k_buffer = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        self.v_buffer = torch.full_like(self.k_buffer, float("nan"))
        # NaN in slot 0 (the padding slot) and in unowned slots: any stray read poisons the output.
        context_len = max(seq_lens) + 5
        self.req_to_token = torch.randint(0, num_slots, (pool_rows, context_len), generator=gen)
        self.req_pool_indices = torch.randperm(pool_rows, generator=gen)[: len(seq_lens)]
        free = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
        self.k_dense, self.v_dense = [], []
        for i, seq_len in enumerate(seq_lens):
            slots = torch.tensor(free[:seq_len], dtype=torch.int64)
            free = free[seq_len:]
            k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
            self.k_buffer[slots], self.v_buffer[slots] = k, v
            self.req_to_token[self.req_pool_indices[i], :seq_len] = slots
            self.k_dense.append(k)
            self.v_dense.append(v)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int64)

    def to(self, device):
        for name in ("k_buffer", "v_buffer", "req_to_token", "req_pool_indices", "seq_lens"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def dense_causal_attention(q, k, v, sm_scale):
    """Plain softmax attention of q [L, H, D] over k/v [L, Hkv, D] with a causal mask."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, 1)
    v = v.float().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * sm_scale
    n = q.shape[0]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@in_process
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_references_match_dense_causal_attention(num_heads, num_kv_heads):
    head_dim, sm_scale = 64, 0.125
    seq_lens, prefix_lens = [9, 1, 23], [0, 0, 15]
    paged = Paged(seq_lens, num_kv_heads, head_dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    q_full = [torch.randn(n, num_heads, head_dim, generator=gen) for n in seq_lens]
    dense = [
        dense_causal_attention(q, k, v, sm_scale)
        for q, k, v in zip(q_full, paged.k_dense, paged.v_dense)
    ]

    q_ext = torch.cat([q[p:] for q, p in zip(q_full, prefix_lens)])
    extend_lens = torch.tensor([n - p for n, p in zip(seq_lens, prefix_lens)])
    o_ext = extend_attention_ref(
        q_ext, paged.k_buffer, paged.v_buffer, torch.empty_like(q_ext), paged.req_to_token,
        paged.req_pool_indices, torch.tensor(prefix_lens), extend_lens, sm_scale,
    )
    expected = torch.cat([d[p:] for d, p in zip(dense, prefix_lens)])
    torch.testing.assert_close(o_ext, expected, rtol=1e-5, atol=1e-5)

    q_dec = torch.stack([q[-1] for q in q_full])
    o_dec = decode_attention_ref(
        q_dec, paged.k_buffer, paged.v_buffer, torch.empty_like(q_dec), paged.req_to_token,
        paged.req_pool_indices, paged.seq_lens, sm_scale,
    )
    torch.testing.assert_close(o_dec, torch.stack([d[-1] for d in dense]), rtol=1e-5, atol=1e-5)


@in_process
@pytest.mark.parametrize(
    "seq_lens,num_heads,num_kv_heads,head_dim,num_kv_splits",
    [
        ([1], 4, 4, 64, 8),  # a single key: one non-empty split
        ([5, 40, 17], 6, 2, 64, 8),  # ragged, GQA 3, some splits empty
        ([150, 3], 6, 2, 64, 4),  # several KV blocks per split
        ([33, 70, 2, 16], 4, 4, 64, 1),  # no split: stage 2 is a pass-through
        ([20, 9], 4, 2, 80, 8),  # head_dim not a power of two
    ],
)
def test_decode_kernel_matches_reference(seq_lens, num_heads, num_kv_heads, head_dim,
                                         num_kv_splits):
    paged = Paged(seq_lens, num_kv_heads, head_dim, seed=len(seq_lens) + head_dim).to(DEVICE)
    q = torch.randn(len(seq_lens), num_heads, head_dim, device=DEVICE)
    args = (paged.k_buffer, paged.v_buffer)
    rest = (paged.req_to_token, paged.req_pool_indices, paged.seq_lens, head_dim**-0.5)
    out = decode_attention_fwd(q, *args, torch.empty_like(q), *rest, num_kv_splits=num_kv_splits)
    ref = decode_attention_ref(q, *args, torch.empty_like(q), *rest)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@in_process
def test_decode_padding_row_with_no_keys_is_zero():
    # CUDA-graph padding rows carry seq_len 0; they must not produce NaN that later layers see.
    paged = Paged([12, 1], 2, 64, seed=5).to(DEVICE)
    paged.seq_lens[1] = 0
    q = torch.randn(2, 2, 64, device=DEVICE)
    rest = (paged.req_to_token, paged.req_pool_indices, paged.seq_lens, 0.125)
    out = decode_attention_fwd(q, paged.k_buffer, paged.v_buffer, torch.empty_like(q), *rest)
    ref = decode_attention_ref(q, paged.k_buffer, paged.v_buffer, torch.empty_like(q), *rest)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@in_process
@pytest.mark.parametrize(
    "prefix_lens,extend_lens,num_heads,num_kv_heads",
    [
        ([0], [21], 4, 4),  # plain prefill, two query blocks
        ([0, 0, 0], [3, 33, 1], 6, 2),  # ragged prefill batch, GQA 3
        ([7, 20, 1], [18, 1, 5], 6, 2),  # on top of cached prefixes; one decode-like row
        ([31, 0], [2, 16], 4, 4),  # prefix longer than the new part; exact block multiple
    ],
)
def test_extend_kernel_matches_reference(prefix_lens, extend_lens, num_heads, num_kv_heads):
    head_dim = 64
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    paged = Paged(seq_lens, num_kv_heads, head_dim, seed=sum(seq_lens)).to(DEVICE)
    num_tokens = sum(extend_lens)
    # q as the engine slices it out of a fused qkv projection: rows are strided, not packed.
    kv_width = 2 * num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, num_heads * head_dim + kv_width, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    rest = (
        paged.req_to_token, paged.req_pool_indices, torch.tensor(prefix_lens, device=DEVICE),
        torch.tensor(extend_lens, device=DEVICE), head_dim**-0.5,
    )
    out = torch.empty(num_tokens, num_heads, head_dim, device=DEVICE)
    extend_attention_fwd(q, paged.k_buffer, paged.v_buffer, out, *rest,
                         max_extend_len=max(extend_lens))
    ref = extend_attention_ref(q, paged.k_buffer, paged.v_buffer, torch.empty_like(out), *rest)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@in_process
def test_extend_with_one_new_token_equals_decode():
    # A mixed batch routes decodes through extend: both kernels must agree on them.
    prefix_lens = [11, 40]
    paged = Paged([p + 1 for p in prefix_lens], 2, 64, seed=7).to(DEVICE)
    q = torch.randn(2, 6, 64, device=DEVICE)
    common = (paged.k_buffer, paged.v_buffer)
    dec = decode_attention_fwd(q, *common, torch.empty_like(q), paged.req_to_token,
                               paged.req_pool_indices, paged.seq_lens, 0.125)
    ext = extend_attention_fwd(q, *common, torch.empty_like(q), paged.req_to_token,
                               paged.req_pool_indices, torch.tensor(prefix_lens, device=DEVICE),
                               torch.ones(2, dtype=torch.int64, device=DEVICE), 0.125)
    torch.testing.assert_close(ext, dec, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["decode", "extend"])
def test_half_precision_model_shapes_on_gpu(dtype, kernel):
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    prefix_lens, extend_lens = [0, 300, 1000, 57], [700, 64, 1, 3]
    if kernel == "decode":
        prefix_lens, extend_lens = [999, 0, 4000, 63], [1, 1, 1, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    paged = Paged(seq_lens, num_kv_heads, head_dim, seed=11, dtype=dtype).to(DEVICE)
    q = torch.randn(sum(extend_lens), num_heads, head_dim, device=DEVICE, dtype=dtype)
    if kernel == "decode":
        rest = (paged.req_to_token, paged.req_pool_indices, paged.seq_lens, head_dim**-0.5)
        fwd, ref_fn = decode_attention_fwd, decode_attention_ref
    else:
        rest = (paged.req_to_token, paged.req_pool_indices,
                torch.tensor(prefix_lens, device=DEVICE),
                torch.tensor(extend_lens, device=DEVICE), head_dim**-0.5)
        fwd, ref_fn = extend_attention_fwd, extend_attention_ref
    out = fwd(q, paged.k_buffer, paged.v_buffer, torch.empty_like(q), *rest)
    ref = ref_fn(q, paged.k_buffer, paged.v_buffer, torch.empty_like(q), *rest)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_decode_replays_in_cuda_graph():
    # The launch grid must not depend on seq_lens values: capture once, replay with new lengths.
    paged = Paged([300, 20, 90], 2, 64, seed=13, dtype=torch.bfloat16).to(DEVICE)
    q = torch.randn(3, 6, 64, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens = paged.seq_lens.clone()
    call = lambda: decode_attention_fwd(  # noqa: E731
        q, paged.k_buffer, paged.v_buffer, out, paged.req_to_token, paged.req_pool_indices,
        seq_lens, 0.125,
    )
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for new_lens in ([1, 20, 90], [300, 7, 64]):
        seq_lens.copy_(torch.tensor(new_lens))
        q.normal_()
        graph.replay()
        ref = decode_attention_ref(q, paged.k_buffer, paged.v_buffer, torch.empty_like(q),
                                   paged.req_to_token, paged.req_pool_indices, seq_lens, 0.125)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
