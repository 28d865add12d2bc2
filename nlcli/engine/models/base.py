"""EngineModel: what the engine reads from every model class nl serves, as plain attributes.

The runner sizes the KV pool and caps the context from it, the scheduler decides whether inputs
may share a cached prefix or be chunked, and weight loads and updates go through `load_weights`.
Every class in `registry.py` defines all of it (tests/test_layout.py checks), so nobody probes a
model with `getattr`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, runtime_checkable

import torch

from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput, Pooler


@runtime_checkable
class EngineModel(Protocol):
    # False for encoders: each input is one whole extend and the K/V pool is never written.
    uses_kv_cache: bool
    # Longest input the position table allows (an encoder's learned positions); None: no table.
    max_positions: Optional[int]
    # Embedders' pooling (its `.pooling` decides whether a cached prefix is usable); None for
    # generators and score heads (last token).
    pooler: Optional[Pooler]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) in place; returns the parameter names loaded."""
        ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 batch: ForwardBatch) -> LogitsOutput | EmbeddingPoolerOutput:
        ...
