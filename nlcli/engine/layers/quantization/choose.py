"""The start-up measurement: how many rows a quantized (or prepacked) matmul still wins at, timed
on the model's own matrices in order, like a decode step reads them.

A sweep over every layer's weight is the working set a real step streams from memory (hundreds of
MB), so it measures the bandwidth-bound regime the quantized kernels are for; one matrix alone
would sit in cache and flatter the dense matmul. A few sweeps per row count, quadrupling the rows
until the candidate stops winning or the time budget (1.5 s) would run out, keep start-up cheap.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch

# A candidate must beat dense by this factor to be used: noise on a shared CPU is a few percent.
MARGIN = 0.9
ROWS = (1, 4, 16, 64)


class Layer(NamedTuple):
    in_features: int
    dense: Callable[[torch.Tensor], torch.Tensor]
    candidate: Callable[[torch.Tensor], torch.Tensor]


class Measurement(NamedTuple):
    max_rows: int  # largest row count where the candidate won; 0: never
    timings: list[tuple[int, float, float]]  # (rows, dense ms, candidate ms) per step

    def text(self) -> str:
        return ", ".join(f"{m} row{'s' if m > 1 else ''}: {d:.1f} -> {c:.1f} ms"
                         for m, d, c in self.timings)


def sweep_seconds(fns: Sequence[Callable], inputs: Sequence[torch.Tensor], reps: int = 2,
                  warm: bool = True) -> float:
    """Best-of-reps seconds for one call of each fn (after a warm-up pass if `warm`)."""
    best = float("inf")
    for i in range(reps + int(warm)):
        start = time.perf_counter()
        for fn, x in zip(fns, inputs):
            fn(x)
        if i or not warm:
            best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure(layers: Sequence[Layer], dtype: torch.dtype, rows: Sequence[int] = ROWS,
            budget_s: float = 1.5) -> Measurement:
    """Time dense vs candidate over all layers at 1, 4, 16, ... rows, stopping at the first loss
    (a threshold between two measured row counts rounds down: the cost of a wrong guess upward
    is the quantized kernel's steep growth with rows)."""
    timings, max_rows, start = [], 0, time.perf_counter()
    for i, m in enumerate(rows):
        if timings:  # 2 timed sweeps each, at up to ~2x the last row count's: keep the budget
            spent = time.perf_counter() - start
            if spent + 2 * 2 * (timings[-1][1] + timings[-1][2]) / 1e3 > budget_s:
                break
        inputs = [torch.randn(m, layer.in_features).to(dtype) for layer in layers]
        dense = sweep_seconds([layer.dense for layer in layers], inputs, warm=i == 0)
        cand = sweep_seconds([layer.candidate for layer in layers], inputs, warm=i == 0)
        timings.append((m, dense * 1e3, cand * 1e3))
        if cand > MARGIN * dense:
            break
        max_rows = m
    return Measurement(max_rows, timings)
