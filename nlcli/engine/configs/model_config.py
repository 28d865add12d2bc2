"""ModelConfig: the facts about a model the engine needs, read once from its HF config.

Built from a ModelSource (and `--context-length`, `--is-embedding`); the HF config object itself
stays available as `.hf_config` for the model classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from nlcli.engine.configs.model_source import ModelSource


@dataclass
class ModelConfig:
    hf_config: Any
    architectures: list[str]
    vocab_size: int
    context_len: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: list[int] = field(default_factory=list)
    is_generation: bool = True

    @classmethod
    def from_source(
        cls, source: ModelSource, context_length: Optional[int] = None, is_embedding: bool = False
    ) -> "ModelConfig":
        cfg = source.hf_config()
        text = getattr(cfg, "text_config", None) or cfg
        heads = getattr(text, "num_attention_heads", 0)
        hidden = getattr(text, "hidden_size", 0)
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
        derived = source.context_len()
        if context_length and context_length > derived:
            # Position tables (rotary caches, learned embeddings) stop at the model's length: a
            # longer request would crash the engine mid-step, so refuse at start-up instead.
            raise ValueError(f"--context-length {context_length} is longer than the model's "
                             f"context length ({derived} tokens).")
        return cls(
            hf_config=cfg,
            architectures=list(getattr(cfg, "architectures", None) or []),
            vocab_size=int(text.vocab_size),
            context_len=int(context_length or derived),
            num_layers=int(getattr(text, "num_hidden_layers", 0)),
            hidden_size=int(hidden),
            num_attention_heads=int(heads),
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            eos_token_ids=source.eos_token_ids(),
            is_generation=not is_embedding,
        )
