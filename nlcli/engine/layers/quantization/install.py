"""`--quantization` resolved into one method per linear layer and the lm_head, and installed.

Modes (SGLang's spelling where it has one): `gguf` keeps a checkpoint's own 4-bit matrices as
4-bit (SGLang's `gguf`; with nl's C kernels its Q8_0 matrices stay 8-bit too; the rest stay
dense), `int8` / `int4` quantize every matrix weight-only (what SGLang spells `--torchao-config
int8wo` / `int4wo-32`; int4 keeps the lm_head at int8), `none` keeps dense matmuls, and `auto`
(the default) is `gguf` where it measures faster for a quantized checkpoint (the file's own
weights, lossless; only the activations are rounded: to int16 per block of 32 in nl's C kernels,
or to bfloat16 in torch's where no C compiler is found) and `none` otherwise. An explicit
`--dtype float32` is never changed by `auto`: it stays exact against transformers.

The quantized copies sit beside the dense weights, which serve large batches and stay the source
of truth: after a weight update `reinstall` rebuilds the copies with the measured plan. The row
count up to which a copy serves is measured at start over the body's matrices, and for the lm_head
apart (one wide matrix, whose quantized copy keeps winning at more rows).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from nlcli.cpu_kernels import ops as cpu_ops
from nlcli.engine.layers.quantization import int4_pack, prepack
from nlcli.engine.layers.quantization.choose import Layer, measure
from nlcli.engine.layers.quantization.methods import (
    Dense,
    Quantized,
    int4_method,
    int8_method,
    q4_blocks_method,
    q8_blocks_method,
)

MODES = ("auto", "none", "gguf", "int8", "int4")
# Row counts the lm_head is measured at beyond the sweep's threshold (_measure_head).
HEAD_ROWS = (32, 64)
# torch's vectorized quantized CPU kernels take bfloat16 activations (float32 is a slow loop).
COMPUTE_DTYPE = torch.bfloat16


@dataclasses.dataclass
class QuantPlan:
    """What was chosen at start, reused when weights change."""
    mode: str  # none, gguf, int8, int4
    max_rows: int = 0
    head_rows: int = 0  # the lm_head's own row count (0: max_rows); measured apart, see below
    prepacked: bool = False
    reason: str = ""
    quantized: int = 0
    total: int = 0
    extra_bytes: int = 0  # the quantized copies, beside the dense weights

    def describe(self) -> str:
        dense = "dense (oneDNN prepacked)" if self.prepacked else "dense"
        if self.mode == "none":
            return f"none: {dense} matmuls ({self.reason})"
        head = f" (the lm_head up to {self.head_rows})" if self.head_rows > self.max_rows else ""
        return (f"{self.mode} for {self.quantized} of {self.total} matrices "
                f"({self.extra_bytes / 2**20:.1f} MiB beside the dense weights) at up to "
                f"{self.max_rows} rows per matmul{head}, {dense} above ({self.reason})")

    def rows_for(self, lm_head: bool) -> int:
        return max(self.head_rows, self.max_rows) if lm_head else self.max_rows


def _targets(model: torch.nn.Module) -> list[tuple[Callable[[object], None], torch.Tensor, bool]]:
    """(install, weight, is_lm_head) for every linear layer and the lm_head."""
    from nlcli.engine.layers.linear import _Linear
    from nlcli.engine.layers.logits import LogitsProcessor

    out = []
    for mod in model.modules():
        if isinstance(mod, _Linear):
            out.append((lambda m, mod=mod: mod.set_method(m), mod.weight.data, False))
    head = getattr(model, "logits_processor", None)
    if isinstance(head, LogitsProcessor) and getattr(model, "lm_head_weight", None) is not None:
        out.append((head.set_method, model.lm_head_weight.data, True))
    return out


def _dense(weight: torch.Tensor, use_prepack: bool):
    return (prepack.prepack(weight) if use_prepack else None) or Dense(weight)


def _quantized(mode: str, weight: torch.Tensor, dense, max_rows: int, lm_head: bool):
    # int4 keeps the lm_head at int8, as llama.cpp's 4-bit files keep their output matrix at 6-8
    # bits: rounded to 4 bits it alone cost SmolLM2 8.6% perplexity (int8 everywhere: 1.5%).
    eight_bit = mode == "int8" or (mode == "int4" and lm_head)
    if cpu_ops.available():
        return _blocks(mode, weight, dense, max_rows, eight_bit)
    if eight_bit:
        return int8_method(weight, dense, COMPUTE_DTYPE, max_rows)
    return int4_method(weight, dense, COMPUTE_DTYPE, max_rows, exact_only=mode == "gguf")


def _blocks(mode: str, weight: torch.Tensor, dense, max_rows: int, eight_bit: bool):
    """nl's C kernels (cpu_kernels): 4-bit as Q4_1 blocks, 8-bit as Q8_0 blocks (per block of
    32, finer than torch's per-row int8), activations rounded to int16 per block. `gguf` keeps
    every matrix that lies on a 4- or 8-bit grid already (a GGUF's Q8_0 output matrix included)
    and nothing else."""
    if eight_bit:
        return q8_blocks_method(weight, dense, max_rows)
    if weight.dim() != 2 or weight.shape[1] % int4_pack.GROUP:
        return None
    grid = int4_pack.grid_of(weight)
    if grid is not None:
        return q4_blocks_method(grid, dense, max_rows, own=True)
    if mode == "gguf":
        return q8_blocks_method(weight, dense, max_rows, exact_only=True)
    return q4_blocks_method(int4_pack.quantize(weight), dense, max_rows, own=False)


def _build(plan: QuantPlan, targets) -> list:
    methods = []
    for _, weight, lm_head in targets:
        dense = _dense(weight, plan.prepacked)
        quant = None if plan.mode == "none" else _quantized(plan.mode, weight, dense,
                                                            plan.rows_for(lm_head), lm_head)
        methods.append(quant or dense)
    return methods


def _measure_head(plan: QuantPlan, targets, methods, dtype: torch.dtype) -> str:
    """The lm_head's own row count. The sweep's threshold is where the body's small matrices stop
    winning; the head is one wide matrix (SmolLM2's: 49152 x 576, 113 MB in float32) whose
    quantized copy keeps winning well past it (Q8_0 18.5 vs dense 34.7 ms at 32 rows), and a
    decode batch of 32 would otherwise read it dense every step."""
    heads = [(w, m) for (_, w, lm_head), m in zip(targets, methods)
             if lm_head and isinstance(m, Quantized)]
    rows = tuple(r for r in HEAD_ROWS if r > plan.max_rows)
    if not heads or not rows:
        return ""
    weight, method = heads[0]
    got = measure([Layer(weight.shape[1], method.dense, method)], dtype, rows=rows)
    plan.head_rows = max(got.max_rows, plan.max_rows)
    return f"; lm_head {got.text()}"


def _choose_prepack(targets, dtype: torch.dtype) -> tuple[bool, str]:
    """oneDNN prepacked dense weights where exact and measured faster at 1 and 32 rows."""
    first = prepack.prepack(targets[0][1])
    if first is None or not prepack.is_exact(first):
        return False, "oneDNN prepack not bit-identical here"
    layers = [Layer(w.shape[1], Dense(w), _dense(w, True)) for _, w, _ in targets]
    got = measure(layers, dtype, rows=(1, 32))
    if got.max_rows < 32:
        return False, f"oneDNN prepack not faster ({got.text()})"
    return True, f"oneDNN prepack {got.text()}"


def install_linear_methods(model: torch.nn.Module, requested: Optional[str], dtype: torch.dtype,
                           device: torch.device, exact_dtype: bool = True) -> QuantPlan:
    """Resolve `--quantization`, measure, install; returns the plan (logged by the caller).

    `exact_dtype`: the user asked for `dtype` by name (not `--dtype auto`), so `auto` keeps a
    float32 model's matmuls in float32."""
    mode = requested or "auto"
    if mode not in MODES:
        raise ValueError(f"--quantization {mode}: nl supports {', '.join(MODES)}")
    targets = _targets(model)
    if device.type != "cpu" or not targets:
        if mode not in ("auto", "none"):
            raise ValueError(f"--quantization {mode} runs on CPU only (torch's CPU kernels)")
        return QuantPlan("none", reason=f"{mode}: no CPU matmuls to change")
    prepacked, why_prepack = _choose_prepack(targets, dtype)
    if mode == "auto":
        if dtype == torch.float32 and exact_dtype:
            plan = QuantPlan("none", prepacked=prepacked,
                             reason="auto: --dtype float32 stays exact; --quantization "
                             f"gguf/int8/int4 trade that for speed; {why_prepack}")
            return reinstall(model, plan)
        mode = "gguf"
    plan = QuantPlan(mode, max_rows=1 << 30, prepacked=prepacked)  # every row, to measure
    src = "auto" if requested in (None, "auto") else f"--quantization {mode}"
    if mode == "none":
        plan.max_rows, plan.reason = 0, f"--quantization none; {why_prepack}"
        return reinstall(model, plan)
    methods = _build(plan, targets)
    layers = [Layer(w.shape[1], m.dense, m) for (_, w, _), m in zip(targets, methods)
              if isinstance(m, Quantized)]
    if not layers:
        plan.mode, plan.max_rows = "none", 0
        plan.reason = f"{src}: no 4- or 8-bit matrices in the checkpoint"
        return reinstall(model, plan)
    got = measure(layers, dtype)
    if src == "auto" and got.max_rows == 0:
        plan.mode, plan.max_rows = "none", 0
        plan.reason = f"auto: {mode} not faster here ({got.text()})"
        return reinstall(model, plan)
    plan.max_rows = max(got.max_rows, 1)  # asked for explicitly: used at one row at least
    head = _measure_head(plan, targets, methods, dtype)
    plan.reason = f"{src}, measured per step {got.text()}{head}; {why_prepack}"
    for (_, _, lm_head), m in zip(targets, methods):
        if isinstance(m, Quantized):
            m.max_rows = plan.rows_for(lm_head)
    return _set(targets, methods, plan)


def reinstall(model: torch.nn.Module, plan: QuantPlan) -> QuantPlan:
    """(Re)build every method from the model's current weights with `plan`'s choices."""
    targets = _targets(model)
    return _set(targets, _build(plan, targets), plan)


def _set(targets, methods, plan: QuantPlan) -> QuantPlan:
    plan.total = len(methods)
    plan.quantized = sum(isinstance(m, Quantized) for m in methods)
    plan.extra_bytes = sum(m.nbytes for m in methods if isinstance(m, Quantized))
    for (install, _, _), method in zip(targets, methods):
        install(None if isinstance(method, Dense) else method)
    return plan
