"""Decoder-only embedding models (gte-Qwen2, e5-mistral, Qwen3-Embedding): the Llama-family body
of `llama.py`, then last-token pooling and L2 normalisation (or whatever the checkpoint's
sentence-transformers files declare).

`DecoderBody` is the shared part of every head on the decoder (also used by
`sequence_classification.py`): it builds the family's `LlamaModel` without an lm_head and maps
both checkpoint layouts onto it: `*ForCausalLM`-style names (`model.layers...`) and bare
`*Model` names (`layers...`, as e5-mistral ships).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from nlcli.engine.configs.embedding_config import EmbeddingConfig, embedding_config_for
from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput, Pooler, PoolingType
from nlcli.engine.models.llama import (
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

# Heads of ours whose weights sit beside the body in the checkpoint (not under `model.`).
_HEAD_PREFIXES = ("score.",)


class DecoderBody:
    """Mixin placed before a `*ForCausalLM` class: reuses that family's attention flags
    (`qkv_bias`, `o_bias`, `qk_norm`) and its `load_weights`, but builds no lm_head."""

    def _init_body(self, config) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = LlamaModel(config, self.qkv_bias(config), self.o_bias(config), self.qk_norm)
        self.pooler: Optional[Pooler] = None  # score heads take the last token; embedders pool

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("lm_head."):
                    continue  # a causal-LM checkpoint served for its hidden states
                if not name.startswith(("model.",) + _HEAD_PREFIXES):
                    name = "model." + name
                yield name, tensor

        return super().load_weights(renamed())


class EmbeddingHead(DecoderBody):
    """Pools the body's final hidden states (last token, L2-normalised, unless the checkpoint's
    sentence-transformers files say otherwise): one embedding per request."""

    default_pooling = "last"

    def __init__(self, config, embedding_config: Optional[EmbeddingConfig] = None):
        self._init_body(config)
        self.embedding_config = embedding_config or embedding_config_for(config, self.default_pooling)
        self.pooler = Pooler(self.embedding_config.pooling, self.embedding_config.normalize)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> EmbeddingPoolerOutput:
        if self.pooler.pooling is not PoolingType.LAST and any(batch.prefix_lens_cpu):
            # Only the last token's state survives a cached prefix; other poolings need them all.
            raise ValueError(f"{self.pooler.pooling.value} pooling cannot extend a cached prefix")
        hidden = self.model(input_ids, positions, batch)
        return self.pooler(hidden, batch.extend_lens_cpu)


class LlamaEmbeddingModel(EmbeddingHead, LlamaForCausalLM):
    pass


class MistralEmbeddingModel(EmbeddingHead, MistralForCausalLM):
    pass


class Qwen2EmbeddingModel(EmbeddingHead, Qwen2ForCausalLM):
    pass


class Qwen3EmbeddingModel(EmbeddingHead, Qwen3ForCausalLM):
    pass

