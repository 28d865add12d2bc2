"""`--json-model-override-args`: a JSON object merged into the model's HF config at load.

Parsed once at start (a bad value stops `nl serve` with a message naming the flag) and applied
by `ModelSource.hf_config()`, so the engine (model classes, context length, EOS ids) and the API
process (embedding dimensions) read the same overridden config. The merge is SGLang's: a plain
value is set as an attribute; a dict onto a sub-config (`text_config`) updates it; a dict for
`rope_scaling` or `rope_parameters` is merged key by key into the existing one.
"""

from __future__ import annotations

import json
from typing import Any

FLAG = "--json-model-override-args"
_MERGED_DICTS = ("rope_scaling", "rope_parameters")


def parse_model_overrides(text: str | None) -> dict:
    """The flag's value as a dict; ValueError with a message naming the flag."""
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{FLAG} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{FLAG} must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def apply_config_overrides(config: Any, overrides: dict) -> Any:
    """Merge `overrides` into the HF config object in place; returns it."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            current.update(value)
        elif isinstance(value, dict) and key in _MERGED_DICTS and isinstance(current, dict):
            setattr(config, key, {**current, **value})
        else:
            setattr(config, key, value)
    return config
