"""Registry: HF `architectures` names -> our model classes, imported lazily."""

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


def register_model(architecture: str, module: str, class_name: str) -> None:
    _MODELS[architecture] = (module, class_name)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architectures: Sequence[str]):
    for arch in architectures or ():
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(f"nlcli.engine.models.{module}"), name)
    raise ValueError(
        f"unsupported model architecture {list(architectures or [])}; "
        f"supported: {', '.join(supported_architectures())}"
    )
