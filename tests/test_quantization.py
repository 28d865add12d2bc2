"""Weight-only quantized matmuls (nlcli/engine/layers/quantization/): the packers against a torch
reference, the per-call dispatch by rows, the exact 4-bit form of the embedded Q4_1 GGUF against
its dense dequantized weights, a perplexity guard for every mode, and re-quantization after a
weight update and its rollback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlcli.engine.layers.quantization import (QuantPlan, install_linear_methods, int4_pack,
                                              int8_pack, prepack, reinstall_linear_methods)
from nlcli.engine.layers.quantization.install import HEAD_ROWS
from nlcli.engine.layers.quantization.methods import Dense, int4_method, int8_method
from nlcli.engine.model_loader.weight_update import update_weights_from_disk
from tests.tiny_models import EngineDriver, make_runner, perturbed_copy

ALL_ROWS = 1 << 30
TEXT = ("The history of astronomy shows how people learned to measure the sky. Early observers "
        "tracked the motion of the sun, the moon and the planets, and used what they saw to keep "
        "calendars, plan harvests and navigate across the sea. Later, telescopes revealed moons "
        "around Jupiter and phases of Venus, and careful measurements of planetary orbits led to "
        "the laws of motion and gravitation that still guide spacecraft today.")


def _grid_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights the way llama.cpp's Q4_1 stores them: d * q + m, both ends of every block used."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-4
    m = -torch.rand(n, k // 32, 1, generator=gen) * 0.08
    return (q * d + m).reshape(n, k)


def test_int4_grid_is_read_back_exactly_and_packs_to_the_same_matmul():
    w = _grid_weight(192, 128)
    q, d, m = int4_pack.grid_of(w)
    assert torch.allclose(int4_pack.unpack(q, d, m), w, rtol=0, atol=1e-7)
    x = torch.randn(5, 128)
    # float32 activations: torch's reference loop, exact up to float rounding.
    y = int4_pack.int4_mm(x, int4_pack.pack(q, d, m, torch.float32))
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    # bfloat16: the fast kernel; within bfloat16's own rounding of x and the scales.
    yb = int4_pack.int4_mm(x.bfloat16(), int4_pack.pack(q, d, m, torch.bfloat16)).float()
    torch.testing.assert_close(yb, F.linear(x, w), rtol=0.03, atol=0.03)


def test_int4_grid_survives_bfloat16_weights():
    # A model loaded in bfloat16 rounded the file's grid: it is read back to bfloat16 precision.
    w = _grid_weight(128, 64).bfloat16()
    q, d, m = int4_pack.grid_of(w)
    bound = w.float().abs().amax() * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(int4_pack.unpack(q, d, m), w.float(), rtol=0, atol=float(bound))
    assert int4_pack.grid_of(torch.randn(128, 64).bfloat16()) is None


def test_int4_rounding_of_weights_off_the_grid():
    w = torch.randn(64, 96)
    assert int4_pack.grid_of(w) is None
    q, d, m = int4_pack.quantize(w)
    assert int(q.max()) <= 15
    err = (int4_pack.unpack(q, d, m) - w).reshape(64, 3, 32).abs()
    assert bool((err <= d / 2 + 1e-6).all())


def test_int8_per_channel_against_torch_reference():
    w = torch.randn(80, 64)
    q, s = int8_pack.quantize(w)
    assert q.dtype == torch.int8
    assert bool(((int8_pack.unpack(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all())
    x = torch.randn(3, 64)
    y = int8_pack.int8_mm(x, int8_pack.pack(q, s, torch.float32))
    torch.testing.assert_close(y, F.linear(x, int8_pack.unpack(q, s)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [int8_method, int4_method])
def test_dispatch_by_rows(make):
    w, bias = _grid_weight(64, 64), torch.randn(64)
    method = make(w, Dense(w), torch.float32, 4)
    small, large = torch.randn(1, 3, 64), torch.randn(5, 64)  # 3 rows <= 4 < 5 rows
    assert torch.equal(method(large, bias), F.linear(large, w, bias))
    ref = F.linear(small, w, bias)
    got = method(small, bias)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)
    assert not torch.equal(got, ref) or make is int4_method  # int8 rounds these weights


def test_prepack_is_used_only_where_bit_identical():
    w = torch.randn(96, 64)
    method = prepack.prepack(w)
    if method is None:
        pytest.skip("oneDNN is not available")
    if prepack.is_exact(method):
        x = torch.randn(3, 64)
        assert torch.equal(method(x), F.linear(x, w))


# ---- the embedded SmolLM2 (Q4_1 GGUF) ----


@pytest.fixture(scope="module")
def smollm2():
    from nlcli.engine.configs.model_source import resolve_model_source

    runner = make_runner(None, max_total_tokens=512, max_running_requests=4, quantization="none")
    ids = resolve_model_source(None).load_tokenizer()(TEXT).input_ids
    return runner, ids


def _all_logits(runner, ids) -> torch.Tensor:
    driver = EngineDriver(runner)
    rid = driver.new_request()
    try:
        return driver.forward([rid], [ids], return_all_logits=True).all_logits.float().clone()
    finally:
        driver.free_all()


def _install(runner, make) -> None:
    from nlcli.engine.layers.linear import _Linear

    for mod in runner.model.modules():
        if isinstance(mod, _Linear):
            mod.set_method(make(mod.weight.data))


def test_gguf_int4_is_the_same_weights_as_the_dense_path(smollm2):
    runner, ids = smollm2
    ids = ids[:12]  # float32 activations run torch's reference loop: keep it short
    dense = _all_logits(runner, ids)
    made = []
    _install(runner, lambda w: made.append(int4_method(w, Dense(w), torch.float32, ALL_ROWS,
                                                       exact_only=True)) or made[-1])
    try:
        assert all(m is not None and "own" in m.kind for m in made)  # every matrix is Q4_1
        exact = _all_logits(runner, ids)
    finally:
        reinstall_linear_methods(runner.model, QuantPlan("none"))
    torch.testing.assert_close(exact, dense, rtol=0, atol=2e-4)
    assert torch.equal(exact.argmax(-1), dense.argmax(-1))


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1], -1)
    return float(torch.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))


@pytest.mark.parametrize("mode", ["gguf", "int8", "int4"])
def test_perplexity_within_two_percent_of_dense(smollm2, mode):
    runner, ids = smollm2
    dense = _all_logits(runner, ids)
    plan = reinstall_linear_methods(runner.model, QuantPlan(mode, max_rows=ALL_ROWS))
    try:
        assert plan.quantized >= 120
        quant = _all_logits(runner, ids)
    finally:
        reinstall_linear_methods(runner.model, QuantPlan("none"))
    ppl_dense, ppl_quant = _perplexity(dense, ids), _perplexity(quant, ids)
    agree = float((dense.argmax(-1) == quant.argmax(-1)).float().mean())
    print(f"\n{mode}: {plan.quantized}/{plan.total} matrices, perplexity {ppl_dense:.3f} dense -> "
          f"{ppl_quant:.3f}, greedy agreement {agree:.1%} over {len(ids)} positions")
    assert abs(ppl_quant / ppl_dense - 1) < 0.02
    assert agree >= 0.8


def test_auto_under_dtype_auto_measures_the_gguf_4bit_path(smollm2):
    """`--dtype auto` resolving to float32 does not pin exactness: the embedded Q4_1 GGUF gets
    its own 4-bit matrices where they measure faster (the outcome depends on this CPU, so both
    are accepted; the reason must say a measurement decided)."""
    runner, _ = smollm2
    plan = install_linear_methods(runner.model, None, torch.float32, torch.device("cpu"),
                                  exact_dtype=False)
    try:
        assert "stays exact" not in plan.reason
        if plan.mode == "gguf":
            assert plan.quantized >= 120 and plan.max_rows >= 1
            assert plan.reason.startswith("auto, measured per step")
        else:
            assert plan.reason.startswith("auto: gguf not faster here")
    finally:
        reinstall_linear_methods(runner.model, QuantPlan("none"))


# ---- weight updates re-quantize ----


def test_weight_update_and_rollback_requantize(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    perturbed = perturbed_copy(base, str(tmp_path / "perturbed"))
    prompt = [[5, 17, 301, 44, 9, 1200, 77]]

    def quantized_runner(path):
        runner = make_runner(path, quantization="int8")
        runner.quant_plan.max_rows = ALL_ROWS  # the measurement may say otherwise on this CPU
        runner.weights_changed()
        assert runner.quant_plan.quantized == runner.quant_plan.total > 0
        return runner

    def logits(runner):
        driver = EngineDriver(runner)
        rid = driver.new_request()
        try:
            return driver.forward([rid], prompt, return_all_logits=True).all_logits.clone()
        finally:
            driver.free_all()

    live = quantized_runner(base)
    before = logits(live)
    assert update_weights_from_disk(live, perturbed).success
    assert torch.equal(logits(live), logits(quantized_runner(perturbed)))
    assert update_weights_from_disk(live, base).success
    assert torch.equal(logits(live), before)


def test_the_lm_head_keeps_its_own_row_count(tiny_model_dir):
    """The lm_head is measured apart from the body (one wide matrix whose quantized copy wins at
    more rows); its count is applied to it alone and survives a rebuild after a weight change."""
    runner = make_runner(tiny_model_dir("llama"), quantization="int8")
    plan = runner.quant_plan
    assert plan.rows_for(lm_head=True) >= plan.max_rows >= 1
    # the head's measurement past the body's count is reported (none where the body won at 64)
    assert "lm_head" in plan.reason or plan.max_rows >= max(HEAD_ROWS)
    plan = reinstall_linear_methods(runner.model, QuantPlan("int8", max_rows=2, head_rows=8))
    body = {m.method.max_rows for m in runner.model.modules() if hasattr(m, "set_method")
            and m is not runner.model.logits_processor}
    assert body == {2} and runner.model.logits_processor.method.max_rows == 8
    assert "at up to 2 rows per matmul (the lm_head up to 8)" in plan.describe()
    x = torch.randn(8, runner.model.config.hidden_size)
    w = runner.model.lm_head_weight
    head = runner.model.logits_processor.method
    # 8 rows take the quantized head (rounded weights), 9 the dense one (exact).
    assert not torch.equal(head(x), F.linear(x, w))
    x9 = torch.randn(9, x.shape[1])
    assert torch.equal(head(x9), F.linear(x9, w))


def test_auto_changes_no_float32_model_and_no_model_without_a_4bit_grid(tiny_model_dir):
    base = tiny_model_dir("llama")
    f32 = make_runner(base)  # quantization unset: auto
    assert f32.quant_plan.mode == "none" and f32.quant_plan.quantized == 0
    assert "float32 stays exact" in f32.quant_plan.describe()
    bf16 = make_runner(base, dtype="bfloat16")
    assert bf16.quant_plan.mode == "none"
    assert "no 4- or 8-bit matrices" in bf16.quant_plan.describe()
    explicit = make_runner(base, quantization="int8")
    assert explicit.quant_plan.quantized == explicit.quant_plan.total > 0
    assert "--quantization int8, measured per step 1 row" in explicit.quant_plan.describe()
