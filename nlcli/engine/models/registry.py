"""Registry: HF `architectures` names -> our model classes, imported lazily.

Generation servers use `_MODELS`. Embedding servers (`--is-embedding`) look in `_EMBEDDING_MODELS`
first, so a `Qwen2ForCausalLM` checkpoint such as gte-Qwen2 is served as a last-token embedder;
encoder-only and sequence-classification architectures exist only as embedding models.
"""

from __future__ import annotations

import importlib
from typing import Sequence

# architecture name -> (module under nlcli.engine.models, class name)
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
}

_EMBEDDING_MODELS = {
    "BertModel": ("bert", "BertModel"),
    "RobertaModel": ("bert", "RobertaModel"),
    "XLMRobertaModel": ("bert", "XLMRobertaModel"),
    # cross-encoder rerankers (/v1/rerank)
    **{f"{family}ForSequenceClassification": ("cross_encoder", f"{family}ForSequenceClassification")
       for family in ("Bert", "Roberta", "XLMRoberta")},
    **{
        f"{family}ForSequenceClassification": ("sequence_classification", f"{family}ForSequenceClassification")
        for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
    },
    **{
        f"{family}{suffix}": ("decoder_embedding", f"{family}EmbeddingModel")
        for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
        for suffix in ("Model", "ForCausalLM")
    },
}


def register_model(architecture: str, module: str, class_name: str) -> None:
    _MODELS[architecture] = (module, class_name)


def supported_architectures(is_embedding: bool = False) -> list[str]:
    return sorted(_EMBEDDING_MODELS if is_embedding else _MODELS)


def is_embedding_only(architectures: Sequence[str]) -> bool:
    """True when the checkpoint can only be served with --is-embedding (encoders, reward heads)."""
    archs = list(architectures or ())
    return bool(archs) and not any(a in _MODELS for a in archs) and any(a in _EMBEDDING_MODELS for a in archs)


def resolve_model_class(architectures: Sequence[str], is_embedding: bool = False):
    table = _EMBEDDING_MODELS if is_embedding else _MODELS
    for arch in architectures or ():
        if arch in table:
            module, name = table[arch]
            return getattr(importlib.import_module(f"nlcli.engine.models.{module}"), name)
    hint = ""
    if not is_embedding and is_embedding_only(architectures):
        hint = " (this is an embedding or reward model: add --is-embedding)"
    raise ValueError(
        f"unsupported model architecture {list(architectures or [])}{hint}; "
        f"supported: {', '.join(supported_architectures(is_embedding))}"
    )
