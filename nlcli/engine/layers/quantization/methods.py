"""Linear methods: callables `method(x, bias) -> y` that a linear layer (layers/linear.py) or the
lm_head (layers/logits.py) runs instead of `F.linear` once installed.

`Quantized` holds a weight-only int8 or int4 copy beside the dense weight and picks per call by
the number of rows: torch's quantized CPU kernels read 4-8x fewer bytes, which wins while a matmul
is bound by memory (decode of a few requests), but they are GEMV-like and lose badly once a batch
is large (issue 11: int8 5.4 ms vs 67.9 ms for bfloat16 at 32 rows), where the dense matmul runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nlcli.cpu_kernels import blocks, ops
from nlcli.engine.layers.quantization import int4_pack, int8_pack


class Dense:
    """Plain `F.linear` on the layer's own (live) weight."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class Quantized:
    """Quantized kernel for calls of at most `max_rows` rows, `dense` above."""

    def __init__(self, kind: str, kernel: Callable[[torch.Tensor], torch.Tensor],
                 compute_dtype: torch.dtype, out_features: int, dense: Callable, max_rows: int,
                 nbytes: int = 0):
        self.kind, self.kernel, self.compute_dtype = kind, kernel, compute_dtype
        self.out_features, self.dense, self.max_rows = out_features, dense, max_rows
        self.nbytes = nbytes  # of the quantized copy, beside the dense weight
        # For nl's C kernels: the packed blocks and their kernel (cpu_kernels.ops.matrix reads
        # them; the fused decode step runs them itself). None for torch's kernels.
        self.blocks, self.c_kind = None, None

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if rows == 0 or rows > self.max_rows:
            return self.dense(x, bias)
        y = self.kernel(x.reshape(rows, x.shape[-1]).to(self.compute_dtype)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


def int8_method(weight: torch.Tensor, dense: Callable, compute_dtype: torch.dtype,
                max_rows: int) -> Quantized:
    packed = int8_pack.pack(*int8_pack.quantize(weight), compute_dtype)
    return Quantized("int8", lambda x: int8_pack.int8_mm(x, packed), compute_dtype,
                     weight.shape[0], dense, max_rows, _nbytes(packed))


def int4_method(weight: torch.Tensor, dense: Callable, compute_dtype: torch.dtype, max_rows: int,
                exact_only: bool = False) -> Optional[Quantized]:
    """int4 from the weight's own 4-bit grid when it has one ("gguf"), else rounded ("int4");
    None when `exact_only` and the weight is not 4-bit, or the shape does not pack."""
    if weight.dim() != 2 or weight.shape[1] % int4_pack.GROUP:
        return None
    grid = int4_pack.grid_of(weight)
    if grid is None and exact_only:
        return None
    q, d, m = grid if grid is not None else int4_pack.quantize(weight)
    try:
        packed = int4_pack.pack(q, d, m, compute_dtype)
    except RuntimeError:  # shapes torch's packer refuses
        return None
    kind = "int4 (checkpoint's own)" if grid is not None else "int4"
    return Quantized(kind, lambda x: int4_pack.int4_mm(x, packed), compute_dtype,
                     weight.shape[0], dense, max_rows, _nbytes(packed))


def q4_blocks_method(grid, dense: Callable, max_rows: int, own: bool) -> Quantized:
    """nl's C kernel (cpu_kernels) over (q, d, m) blocks: float32 in and out, the activations
    rounded to int16 per block inside the kernel (integer dot products, ~15-bit x)."""
    packed = blocks.q4_from_grid(*grid)
    kind = "Q4_1 (checkpoint's own)" if own else "Q4_1"
    return _c_method(kind, packed, ops.Q4, dense, max_rows)


def q8_blocks_method(weight: torch.Tensor, dense: Callable, max_rows: int,
                     exact_only: bool = False) -> Optional[Quantized]:
    """nl's C kernel over Q8_0 blocks of `weight`; None when `exact_only` and the weight is not
    already on such a grid (a GGUF's own Q8_0 matrix is, and is kept bit for bit)."""
    if weight.dim() != 2 or weight.shape[1] % blocks.BLOCK:
        return None
    packed = blocks.q8_quantize(weight)
    own = torch.equal(blocks.q8_dequantize(packed), weight.float())
    if exact_only and not own:
        return None
    kind = "Q8_0 (checkpoint's own)" if own else "Q8_0"
    return _c_method(kind, packed, ops.Q8, dense, max_rows)


def _c_method(kind: str, packed, c_kind: int, dense: Callable, max_rows: int) -> Quantized:
    desc = ops.matrix(packed, c_kind)  # built once: a call then costs one ctypes call
    method = Quantized(kind, lambda x: ops.gemm(x, desc), torch.float32, packed.out_features,
                       dense, max_rows, _nbytes(packed))
    method.blocks, method.c_kind = packed, c_kind
    return method


def _nbytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed if isinstance(t, torch.Tensor))
