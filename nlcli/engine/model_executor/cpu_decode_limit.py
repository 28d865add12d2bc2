"""The largest decode batch nl's C decode step takes: measured at start against the per-op path.

The quantization plan's row count (layers/quantization/choose.py) is where one quantized matmul
stops beating the dense one. The C step goes on winning past it: it also saves the dispatch of
every norm, rotary, residual add and attention call of the per-op path, and both paths run the
same lm_head (with its own row count) and the same attention kernel. On the embedded SmolLM2 on a
2-vCPU EPYC, a decode step of 32 one-token requests took 130 ms per-op and 109 ms in C, with the
body's matmuls on a par at 32 rows (64: 207 vs 267 ms, the C step's loss).

So once the pools exist, one decode step of B one-token requests runs through each path at twice,
four times, ... the plan's row count, and the C step takes batches up to the largest B where it
won by choose.MARGIN, stopping at the first loss, at the pools' size, or when the next pair would
outrun the time budget. Attention over longer contexts adds the same kernel time to both paths.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import torch

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.quantization.choose import MARGIN

MAX_BATCH = 128
BUDGET_S = 1.5


class Limit(NamedTuple):
    max_batch: int
    timings: list[tuple[int, float, float]]  # (batch, per-op ms, C ms)

    def text(self) -> str:
        return ", ".join(f"{b}: {per_op:.1f} -> {c:.1f} ms" for b, per_op, c in self.timings)


def largest_winning_batch(step_seconds: Callable[[int, bool], Optional[float]], start: int,
                          cap: int = MAX_BATCH, budget_s: float = BUDGET_S) -> Limit:
    """`step_seconds(batch, fused)`: one decode step's seconds through the C step (`fused`) or the
    per-op path, None where the batch does not fit the pools. `start`: the plan's row count."""
    timings: list[tuple[int, float, float]] = []
    best, batch, began = start, 2 * start, time.perf_counter()
    while start > 0 and batch <= cap:
        if timings:  # the next pair costs about twice the last (twice the rows)
            spent = time.perf_counter() - began
            if spent + 2 * (timings[-1][1] + timings[-1][2]) / 1e3 > budget_s:
                break
        per_op = step_seconds(batch, False)
        fused = step_seconds(batch, True) if per_op is not None else None
        if per_op is None or fused is None:
            break
        timings.append((batch, per_op * 1e3, fused * 1e3))
        if fused > MARGIN * per_op:
            break
        best, batch = batch, 2 * batch
    return Limit(best, timings)


def decode_step_timer(runner) -> Callable[[int, bool], Optional[float]]:
    """`step_seconds` over a ModelRunner's own model and pools: B requests of one token each,
    best of two steps (the first also pays one-time costs), the pools freed after."""

    @torch.inference_mode()
    def step_seconds(batch_size: int, fused: bool) -> Optional[float]:
        rows = runner.req_to_token_pool.alloc(batch_size)
        slots = runner.token_to_kv_pool_allocator.alloc(batch_size)
        try:
            if rows is None or slots is None:
                return None
            runner.req_to_token_pool.req_to_token[rows, 0] = slots
            vocab = runner.model_config.vocab_size
            batch = ForwardBatch.create([[i % vocab] for i in range(batch_size)], [0] * batch_size,
                                        rows, slots, runner.device)
            best = float("inf")
            for _ in range(2):
                began = time.perf_counter()
                if fused:
                    runner.cpu_decode_runner.forward(batch)
                else:
                    batch.plan_attention(runner.attn_backend)
                    runner.model(batch.input_ids, batch.positions, batch)
                best = min(best, time.perf_counter() - began)
            return best
        finally:
            if slots is not None:
                runner.token_to_kv_pool_allocator.free(slots)
            if rows is not None:
                runner.req_to_token_pool.free(rows)

    return step_seconds
