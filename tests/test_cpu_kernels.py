"""nl's C CPU kernels (nlcli/cpu_kernels) against torch references of the same arithmetic.

- Block matmuls: Q4_1 and Q8_0 weights with x rounded to int16 per block must equal
  (rounded x) @ (dequantized w).T to float rounding, and x @ (dequantized w).T to ~1e-4 of its
  scale. Every row count up to past the 4-row tile, and a bias.
- Decode attention over the pool in place must equal SDPA over the gathered K/V, for grouped
  heads, ragged lengths, scattered slots, both ways of sharing out the work, float32 and
  bfloat16 pools.
- Without a C compiler the engine keeps torch's kernels and still serves.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nlcli.cpu_kernels import blocks, build, ops
from nlcli.engine.layers.quantization import int4_pack

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C compiler for nl's CPU kernels")


def round_x(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int16 per block of 32 (absmax -> 32767), back in float: what the kernels see."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 32767
    q = torch.where(d > 0, xb / d, torch.zeros_like(xb)).round()
    return (q * d).reshape(x.shape)


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])
def test_q4_matmul_is_rounded_x_times_the_blocks(rows):
    w = _weights(96, 160, rows)
    packed = blocks.q4_from_grid(*int4_pack.quantize(w))
    wd = blocks.q4_dequantize(packed)
    x = torch.randn(rows, 160) * 3
    got = ops.q4_mm(x, packed)
    torch.testing.assert_close(got, round_x(x) @ wd.T, rtol=1e-5, atol=1e-4)
    # and, x's rounding aside, the float matmul with the dequantized weights
    torch.testing.assert_close(got, x @ wd.T, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_q8_matmul_is_rounded_x_times_the_blocks(rows):
    w = _weights(80, 128, rows)
    packed = blocks.q8_quantize(w)
    wd = blocks.q8_dequantize(packed)
    x = torch.randn(rows, 128)
    torch.testing.assert_close(ops.q8_mm(x, packed), round_x(x) @ wd.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.q8_mm(x, packed), x @ wd.T, rtol=1e-3, atol=1e-4)


def test_gemm_adds_the_bias_and_keeps_leading_dims():
    w, bias = _weights(64, 96, 1), torch.randn(64)
    packed = blocks.q8_quantize(w)
    x = torch.randn(2, 3, 96)
    got = ops.gemm(x, ops.matrix(packed, ops.Q8, bias))
    assert got.shape == (2, 3, 64)
    ref = F.linear(x, blocks.q8_dequantize(packed), bias)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


def test_q8_of_a_q8_grid_gives_back_its_codes_and_scales():
    """A GGUF Q8_0 matrix, dequantized at load, is rounded back to the file's own blocks."""
    w = _weights(48, 64, 3)
    first = blocks.q8_quantize(w)
    again = blocks.q8_quantize(blocks.q8_dequantize(first))
    assert torch.equal(again.codes, first.codes) and torch.equal(again.d, first.d)


def test_q4_blocks_keep_the_grid_exactly():
    w = _weights(32, 64, 4)
    q, d, m = int4_pack.quantize(w)
    packed = blocks.q4_from_grid(q, d, m)
    # float16 scales: the grid's d and m as float16 (GGUF's own are float16 already)
    assert torch.equal(blocks.q4_dequantize(packed),
                       int4_pack.unpack(q, d.half().float(), m.half().float()))


def test_matrix_refuses_a_kind_that_does_not_match_the_blocks():
    packed = blocks.q8_quantize(_weights(32, 32, 5))
    with pytest.raises(ValueError):
        ops.matrix(packed, ops.Q4)


def _sdpa_reference(q, k_buf, v_buf, req_to_token, rows, lens, scale):
    out = []
    for b in range(q.shape[0]):
        slots = req_to_token[rows[b], : lens[b]]
        k = k_buf[slots].transpose(0, 1)  # [Hkv, L, D]
        v = v_buf[slots].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale,
                                                  enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# dim 96: 64 dims in registers, then 8 at a time; 24: 8 at a time, and no multiple of 8 for qk
@pytest.mark.parametrize("batch,heads,kv_heads,dim", [(1, 9, 3, 64), (5, 4, 2, 96), (3, 6, 6, 24),
                                                     (8, 8, 1, 32), (2, 8, 1, 32)])
@pytest.mark.parametrize("longest", [70, 330])
def test_decode_attention_reads_the_pool_in_place(batch, heads, kv_heads, dim, dtype, longest):
    """bfloat16 pools are widened exactly as they are read: the same result as float32 K/V. With
    330 keys, one or two requests split their keys into chunks merged after (split-K), an empty
    chunk included where a one-token request sits beside a long one."""
    g = torch.Generator().manual_seed(batch * 100 + heads + longest)
    pool = batch * longest
    k_buf = torch.randn(pool, kv_heads, dim, generator=g).to(dtype)
    v_buf = torch.randn(pool, kv_heads, dim, generator=g).to(dtype)
    lens = torch.randint(1, longest, (batch,), generator=g)
    lens[-1] = longest - 1
    if batch > 1:
        lens[0] = 1  # a request with only its new token
    req_to_token = torch.zeros(batch + 2, longest + 10, dtype=torch.int64)
    rows = torch.randperm(batch + 2, generator=g)[:batch]
    slots = torch.randperm(pool, generator=g)  # scattered, as after evictions
    used = 0
    for b in range(batch):
        req_to_token[rows[b], : lens[b]] = slots[used : used + lens[b]]
        used += int(lens[b])
    q = torch.randn(batch, heads, dim, generator=g)
    got = ops.decode_attention(q, k_buf, v_buf, req_to_token, rows, lens, dim**-0.5)
    ref = _sdpa_reference(q, k_buf.float(), v_buf.float(), req_to_token, rows, lens, dim**-0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_decode_attention_keeps_extreme_scores_finite():
    """exp of the far tail underflows to 0, never to garbage: one dominant key wins outright."""
    k_buf = torch.zeros(4, 1, 8)
    v_buf = torch.arange(32, dtype=torch.float32).reshape(4, 1, 8)
    k_buf[2] = 50.0
    req_to_token = torch.arange(4).reshape(1, 4)
    q = torch.full((1, 1, 8), 10.0)
    got = ops.decode_attention(q, k_buf, v_buf, req_to_token, torch.tensor([0]),
                               torch.tensor([4]), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], v_buf[2, 0])


def test_portable_build_without_avx2_agrees(tmp_path, monkeypatch):
    """A CPU without AVX2/FMA/F16C gets the plain C loops: the same results."""
    flags = [f for f in build.FLAGS if f != "-march=native"] + ["-mno-avx2", "-mno-fma", "-mno-f16c"]
    monkeypatch.setattr(build, "FLAGS", flags)
    monkeypatch.setenv("NL_CACHE_DIR", str(tmp_path))
    ops._library.cache_clear()
    try:
        assert ops.available(), ops.unavailable_reason()
        assert any(tmp_path.rglob("*.so"))  # this build, not the cached native one
        test_q4_matmul_is_rounded_x_times_the_blocks(5)
        test_q8_matmul_is_rounded_x_times_the_blocks(3)
        test_decode_attention_reads_the_pool_in_place(5, 4, 2, 96, torch.bfloat16, 70)
        test_decode_attention_reads_the_pool_in_place(2, 8, 1, 32, torch.float32, 330)  # split-K
        test_decode_attention_keeps_extreme_scores_finite()
    finally:
        ops._library.cache_clear()


def test_unwritable_cache_builds_under_the_temp_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a cache dir below a file cannot be made, even by root
    monkeypatch.setenv("NL_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = build.build()
    assert path.is_relative_to(tmp_path / "tmp") and path.exists()


def test_build_key_follows_the_sources(tmp_path, monkeypatch):
    """A changed source is a new build, never a stale library."""
    cc = build._compiler()
    before = build._key(cc)
    src = tmp_path / "csrc"
    src.mkdir()
    for f in build.CSRC.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "kernels.h").write_text((src / "kernels.h").read_text() + "\n/* changed */\n")
    monkeypatch.setattr(build, "CSRC", src)
    assert build._key(cc) != before


def test_without_a_compiler_torch_kernels_serve(tmp_path):
    """No C compiler: a warning, torch's int4 kernels and per-op decode, and generation works."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama", str(tmp_path / "model"))
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from tests.tiny_models import make_runner, EngineDriver\n"
        "from nlcli.cpu_kernels import ops\n"
        f"r = make_runner({model!r}, max_total_tokens=256, max_running_requests=2, "
        "quantization='int4')\n"
        "assert not ops.available() and r.cpu_decode_runner is None\n"
        "assert not r.attn_backend.c_decode\n"
        "assert r.quant_plan.quantized and 'int4' in r.quant_plan.describe()\n"
        "print('TOKENS', EngineDriver(r).generate_greedy([[504, 3575, 282]], 6)[0])\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), NL_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nl CPU kernels unavailable" in done.stderr + done.stdout
    assert "TOKENS [" in done.stdout
