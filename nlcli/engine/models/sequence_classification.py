"""Sequence-classification / reward heads on the Llama-family decoder (`*ForSequenceClassification`:
Skywork-Reward, ArmoRM-style reward models, classifiers): the shared body, then the checkpoint's
`score` linear applied to each request's last token. `/classify` returns those scores as floats.
"""

from __future__ import annotations

import torch
from torch import nn

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput
from nlcli.engine.models.decoder_embedding import DecoderBody
from nlcli.engine.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


class ScoreHead(DecoderBody):
    def __init__(self, config):
        self._init_body(config)
        # Small (num_labels x hidden): every tensor-parallel rank keeps all of it.
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.score.weight.requires_grad_(False)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> EmbeddingPoolerOutput:
        hidden = self.model(input_ids, positions, batch)
        # transformers picks the last non-pad token of a padded row; our rows are unpadded, so
        # that is each request's last token (a cached prefix changes nothing: it is causal).
        last = torch.cumsum(batch.extend_lens, dim=0) - 1
        return EmbeddingPoolerOutput(embeddings=self.score(hidden[last]).float())


class LlamaForSequenceClassification(ScoreHead, LlamaForCausalLM):
    pass


class MistralForSequenceClassification(ScoreHead, MistralForCausalLM):
    pass


class Qwen2ForSequenceClassification(ScoreHead, Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(ScoreHead, Qwen3ForCausalLM):
    pass

