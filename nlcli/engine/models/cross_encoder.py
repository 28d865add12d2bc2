"""Cross-encoder rerankers: `BertForSequenceClassification` and `(XLM)RobertaForSequenceClassification`
(bge-reranker, ms-marco cross-encoders). The BERT encoder of bert.py reads a (query, document)
pair, with segment ids from `batch.token_type_ids`, and the checkpoint's head scores its first
token: BERT's tanh pooler then `classifier`; RoBERTa's `classifier.dense`, tanh, `out_proj`.
Scores are the raw logits (SGLang's default), unless the config names a sentence-transformers
activation (`sbert_ce_default_activation_function`, e.g. Sigmoid). `/v1/rerank` reads them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nlcli.engine.configs.embedding_config import EmbeddingConfig
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput
from nlcli.engine.models.bert import BertModel, RobertaModel

# Only these activations may be named by a checkpoint's config (never an arbitrary import).
_ACTIVATIONS = {"Identity": nn.Identity, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}


def _activation(config) -> nn.Module:
    name = getattr(config, "sbert_ce_default_activation_function", None)
    if not name:
        return nn.Identity()
    short = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.nn.modules.") or short not in _ACTIVATIONS:
        raise ValueError(f"unsupported cross-encoder activation {name!r}; "
                         f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[short]()


class _CrossEncoder:
    """The shared half: encode the pair, score its first token with `head(cls_states)`."""

    head_prefixes: tuple[str, ...] = ()

    def _init_head(self, config) -> None:
        self.activation = _activation(config)

    def head(self, cls_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, input_ids, positions, forward_batch, token_type_ids=None) -> EmbeddingPoolerOutput:
        if any(forward_batch.prefix_lens_cpu):
            raise ValueError("encoder models cannot extend a cached prefix")
        lengths = forward_batch.extend_lens_cpu
        if token_type_ids is None:
            token_type_ids = forward_batch.token_type_ids
        hidden = self.encode(input_ids, positions, lengths, token_type_ids)
        starts = torch.cumsum(torch.tensor([0, *lengths[:-1]], device=hidden.device), 0)
        scores = self.activation(self.head(hidden[starts]))
        return EmbeddingPoolerOutput(embeddings=scores.float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The encoder's weights go to bert.py's loader; the head's are copied here."""
        params = dict(self.named_parameters())
        mine: set[str] = set()

        def encoder_weights():
            for hf_name, tensor in weights:
                name = self._strip(hf_name)
                if not name.startswith(self.head_prefixes):
                    yield hf_name, tensor
                    continue
                ours = self.head_names.get(name.rsplit(".", 1)[0])
                if ours is None:
                    raise KeyError(f"unexpected weight {hf_name!r}")
                target = f"{ours}.{name.rsplit('.', 1)[1]}"
                if params[target].shape != tensor.shape:
                    raise RuntimeError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                                       f"expected {tuple(params[target].shape)}")
                params[target].data.copy_(tensor)
                mine.add(target)

        return BertModel.load_weights(self, encoder_weights()) | mine


class BertForSequenceClassification(_CrossEncoder, BertModel):
    head_prefixes = ("pooler.", "classifier.")
    head_names = {"pooler.dense": "pool_dense", "classifier": "classifier"}

    def __init__(self, config):
        BertModel.__init__(self, config, EmbeddingConfig("cls", False))
        self.pool_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_head(config)
        self.requires_grad_(False)

    def head(self, cls_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pool_dense(cls_states)))


class RobertaForSequenceClassification(_CrossEncoder, RobertaModel):
    head_prefixes = ("classifier.",)
    head_names = {"classifier.dense": "cls_dense", "classifier.out_proj": "out_proj"}

    def __init__(self, config):
        RobertaModel.__init__(self, config, EmbeddingConfig("cls", False))
        self.cls_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self._init_head(config)
        self.requires_grad_(False)

    def head(self, cls_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.cls_dense(cls_states)))


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass
