"""The C decode step (model_executor/cpu_decode_runner.py) against the per-op torch path.

Both run the same quantized weights through the same block kernels (x rounded to int16 per block);
they differ in the order of sums around them (norms, rotary, softmax), and a last-bit difference
before a rounding moves an int16 code by one, so logits agree to 1e-3, and greedy tokens exactly,
step after step: Llama (llama3 rope, untied head), Mistral and Qwen2 (qkv bias, tied head), one and
several requests of different lengths, float32 and bfloat16. A structural slip (a rotary, a
residual, a head) would be off by whole units. On the embedded SmolLM2 (the GGUF's own Q4_1
weights, the default) teacher-forced decoding through the C step stays within 2% perplexity of
dense float32 with high greedy agreement.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nlcli.cpu_kernels import ops
from nlcli.engine.layers.quantization import reinstall_linear_methods
from tests.test_quantization import TEXT
from tests.tiny_models import EngineDriver, make_runner

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C compiler for nl's CPU kernels")

PROMPTS = [[504, 3575, 282, 4649, 314], [9690, 198], list(range(300, 331))]


def _allow_rows(runner, rows: int) -> None:
    """Quantized kernels and the C step up to `rows` requests (the start-up measurement may have
    picked fewer for a tiny model), so both paths run the same weights at every batch size."""
    runner.quant_plan = reinstall_linear_methods(
        runner.model, dataclasses.replace(runner.quant_plan, max_rows=rows))
    runner.cpu_decode_runner.max_rows = rows
    runner.cpu_decode_runner.refresh()


def _decode(runner, prompts, steps: int, fused: bool):
    """Greedy decode; (tokens, [steps, batch, vocab] logits, C-step calls)."""
    c_step, calls = runner.cpu_decode_runner, []
    forward = c_step.forward
    c_step.forward = lambda batch: calls.append(batch.batch_size) or forward(batch)
    saved, runner.cpu_decode_runner = c_step, c_step if fused else None
    driver = EngineDriver(runner)
    rids = [driver.new_request() for _ in prompts]
    try:
        out = driver.forward(rids, [list(p) for p in prompts])
        tokens = [[t] for t in out.next_token_logits.argmax(-1).tolist()]
        logits = []
        for _ in range(steps):
            out = driver.forward(rids, [[t[-1]] for t in tokens])
            logits.append(out.next_token_logits.clone())
            for t, nxt in zip(tokens, out.next_token_logits.argmax(-1).tolist()):
                t.append(nxt)
        return tokens, torch.stack(logits), calls
    finally:
        driver.free_all()
        runner.cpu_decode_runner = saved
        c_step.forward = forward


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_c_step_matches_the_per_op_path(tiny_model_dir, arch):
    runner = make_runner(tiny_model_dir(arch), quantization="int8")
    assert runner.cpu_decode_runner is not None
    _allow_rows(runner, 8)
    for prompts in (PROMPTS[:1], PROMPTS):
        fused_tokens, fused, calls = _decode(runner, prompts, 6, fused=True)
        torch_tokens, per_op, no_calls = _decode(runner, prompts, 6, fused=False)
        assert calls == [len(prompts)] * 6 and no_calls == []
        assert fused_tokens == torch_tokens
        torch.testing.assert_close(fused, per_op, rtol=1e-3, atol=1e-3)


def test_c_step_serves_a_bfloat16_model(tiny_model_dir):
    """bfloat16 weights and KV pool (what `--dtype auto` picks on AVX512-BF16/AMX CPUs): the C
    step keeps float32 activations where the per-op path rounds each op's output to bfloat16,
    so the two agree to bfloat16's precision, and it writes the pool the per-op path reads."""
    runner = make_runner(tiny_model_dir("llama"), quantization="int8", dtype="bfloat16")
    assert runner.cpu_decode_runner is not None and runner.token_to_kv_pool.dtype == torch.bfloat16
    _allow_rows(runner, 4)
    fused_tokens, fused, calls = _decode(runner, PROMPTS[:2], 4, fused=True)
    torch_tokens, per_op, _ = _decode(runner, PROMPTS[:2], 4, fused=False)
    assert calls == [2] * 4
    assert fused_tokens == torch_tokens
    # the per-op path rounds every op to bfloat16 (8-bit mantissas): ~1% apart over two layers
    assert float((fused - per_op).norm() / per_op.norm()) < 0.03


def test_c_step_follows_a_weight_change(tiny_model_dir):
    runner = make_runner(tiny_model_dir("llama"), quantization="int8")
    _allow_rows(runner, 4)
    before, _, _ = _decode(runner, PROMPTS[:2], 4, fused=True)
    with torch.no_grad():
        for p in runner.model.parameters():
            p.mul_(-1.3)  # every matrix and norm changes
    runner.weights_changed()
    fused_tokens, fused, _ = _decode(runner, PROMPTS[:2], 4, fused=True)
    torch_tokens, per_op, _ = _decode(runner, PROMPTS[:2], 4, fused=False)
    assert fused_tokens == torch_tokens != before
    torch.testing.assert_close(fused, per_op, rtol=1e-3, atol=1e-3)


def test_batches_over_the_row_limit_take_the_per_op_path(tiny_model_dir):
    runner = make_runner(tiny_model_dir("llama"), quantization="int8")
    _allow_rows(runner, 2)
    _, _, calls = _decode(runner, PROMPTS, 2, fused=True)
    assert calls == []  # 3 requests > 2 rows: the dense matmuls' side


@pytest.mark.parametrize("arch,quantization", [("qwen3", "int8"), ("llama", "none")])
def test_c_step_is_off_where_it_does_not_apply(tiny_model_dir, arch, quantization):
    """qwen3's per-head q/k norm is not in the C step; `none` keeps dense float32 matmuls."""
    runner = make_runner(tiny_model_dir(arch), quantization=quantization)
    assert runner.cpu_decode_runner is None
    assert EngineDriver(runner).generate_greedy(PROMPTS[:1], 3)  # and the per-op path serves


@pytest.mark.slow
def test_smollm2_gguf_through_the_c_step_keeps_its_perplexity():
    from nlcli.engine.configs.model_source import resolve_model_source

    runner = make_runner(None, max_total_tokens=512, max_running_requests=2, quantization="gguf")
    assert runner.cpu_decode_runner is not None
    ids = resolve_model_source(None).load_tokenizer()(TEXT).input_ids

    def teacher_forced(fused: bool) -> torch.Tensor:
        """Logits for ids[1:], one decode step per token after a one-token prefill."""
        saved = runner.cpu_decode_runner
        runner.cpu_decode_runner = saved if fused else None
        driver = EngineDriver(runner)
        rid = driver.new_request()
        try:
            rows = [driver.forward([rid], [ids[:1]]).next_token_logits]
            rows += [driver.forward([rid], [[t]]).next_token_logits for t in ids[1:-1]]
            return torch.cat(rows).float()
        finally:
            driver.free_all()
            runner.cpu_decode_runner = saved

    quant = teacher_forced(fused=True)
    runner.quant_plan = reinstall_linear_methods(runner.model,
                                                 dataclasses.replace(runner.quant_plan, mode="none"))
    dense = teacher_forced(fused=False)
    target = torch.tensor(ids[1:])

    def ppl(logits):
        return float(torch.exp(torch.nn.functional.cross_entropy(logits, target)))

    agree = float((quant.argmax(-1) == dense.argmax(-1)).float().mean())
    print(f"\nC step, gguf: perplexity {ppl(dense):.3f} dense -> {ppl(quant):.3f}, "
          f"greedy agreement {agree:.1%} over {len(target)} positions")
    assert abs(ppl(quant) / ppl(dense) - 1) < 0.02
    assert agree >= 0.9
