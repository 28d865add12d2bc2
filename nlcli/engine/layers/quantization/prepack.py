"""Dense weights reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`),
so no matmul repacks them per call. Used only where the result is bit-identical to `F.linear` on
this CPU and dtype and the measurement says it is faster (issue 11: bfloat16 on an AMX Xeon,
16.7 -> 12.0 ms per step, identical); on the AVX2 development CPU float32 results differ in the
last bits, so it stays off there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Prepacked:
    kind = "dense (oneDNN prepacked)"

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor):
        self.weight, self.packed = weight, packed

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] == 0:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def prepack(weight: torch.Tensor, rows: int = 1) -> Optional[Prepacked]:
    """A prepacked method, or None where oneDNN is missing or refuses the weight."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return Prepacked(weight, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
    except (RuntimeError, AttributeError):
        return None


def is_exact(method: Prepacked, row_counts: tuple[int, ...] = (1, 7, 32, 200)) -> bool:
    """Bit-identical to F.linear for random inputs of these row counts."""
    gen = torch.Generator().manual_seed(0)
    for rows in row_counts:
        x = torch.randn(rows, method.weight.shape[1], generator=gen).to(method.weight.dtype)
        try:
            if not torch.equal(method(x), F.linear(x, method.weight)):
                return False
        except RuntimeError:
            return False
    return True
