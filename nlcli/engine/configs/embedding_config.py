"""EmbeddingConfig: how an embedding model pools and normalises, from sentence-transformers files.

A sentence-transformers checkpoint declares its pipeline in `modules.json` (Transformer -> Pooling
-> Normalize), the pooling mode in `<pooling dir>/config.json`, and tokenizer limits in
`sentence_bert_config.json`. Models without those files get the architecture's default (CLS for
BERT encoders, last token for decoder embedders, both normalised, as SGLang does).

Importing this module must not import torch: the API process reads `max_seq_length` and
`do_lower_case` from it to tokenize the way sentence-transformers does, and checks and applies a
/v1/embeddings `dimensions` (Matryoshka truncation) with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "last", "max", "mean_sqrt_len")

# Flag names in a Pooling module's config.json -> our pooling mode.
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# The string form (`"pooling_mode": "lasttoken"`) sentence-transformers also accepts.
_POOLING_NAMES = {
    "mean": "mean",
    "cls": "cls",
    "lasttoken": "last",
    "last": "last",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
}
# Module classes we understand. The dotted path before the class name moved between
# sentence-transformers releases (`sentence_transformers.models.Pooling`, later
# `sentence_transformers.sentence_transformer.modules.pooling.Pooling`), so match on the class.
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class EmbeddingConfig:
    pooling: str  # one of POOLING_MODES
    normalize: bool
    max_seq_length: Optional[int] = None  # truncate inputs to this many tokens (sentence-transformers)
    do_lower_case: bool = False  # lowercase text before tokenizing
    from_sentence_transformers: bool = False  # False: the architecture's default was used

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {self.pooling!r}; expected one of {POOLING_MODES}")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pooling_from_config(cfg: dict, where: str) -> str:
    if "pooling_mode" in cfg:
        names = cfg["pooling_mode"]
        names = [names] if isinstance(names, str) else list(names)
        if len(names) != 1 or names[0] not in _POOLING_NAMES:
            raise ValueError(f"{where}: unsupported pooling_mode {cfg['pooling_mode']!r}")
        return _POOLING_NAMES[names[0]]
    if cfg.get("pooling_mode_weightedmean_tokens"):
        raise ValueError(f"{where}: weighted-mean pooling is not supported")
    chosen = [mode for flag, mode in _POOLING_FLAGS.items() if cfg.get(flag)]
    if len(chosen) != 1:
        # sentence-transformers concatenates several modes; no served model we know does that.
        raise ValueError(f"{where}: expected exactly one pooling mode, found {chosen or 'none'}")
    if cfg.get("include_prompt") is False:
        logger.warning("%s: include_prompt=false is ignored; prompts are pooled with the text", where)
    return chosen[0]


def read_embedding_config(
    model_dir: str, default_pooling: str = "cls", default_normalize: bool = True
) -> EmbeddingConfig:
    """Read `model_dir`'s sentence-transformers files; fall back to the given defaults."""
    max_seq_length: Optional[int] = None
    do_lower_case = False
    sbert_path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(sbert_path):
        sbert = _read_json(sbert_path)
        max_seq_length = sbert.get("max_seq_length")
        do_lower_case = bool(sbert.get("do_lower_case", False))

    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return EmbeddingConfig(default_pooling, default_normalize, max_seq_length, do_lower_case)

    modules = sorted(_read_json(modules_path), key=lambda m: m.get("idx", 0))
    pooling: Optional[str] = None
    normalize = False
    for module in modules:
        kind = module.get("type", "")
        cls_name = kind.rsplit(".", 1)[-1]
        if not kind.startswith("sentence_transformers.") or cls_name not in _KNOWN_MODULES:
            # Dense projections and the like change the vector; silently skipping them would
            # serve wrong embeddings, so refuse instead.
            raise ValueError(f"{modules_path}: unsupported sentence-transformers module {kind!r}")
        if cls_name == "Pooling":
            cfg_path = os.path.join(model_dir, module.get("path", ""), "config.json")
            pooling = _pooling_from_config(_read_json(cfg_path), cfg_path)
        elif cls_name == "Normalize":
            normalize = True
    if pooling is None:
        raise ValueError(f"{modules_path}: no Pooling module")
    return EmbeddingConfig(pooling, normalize, max_seq_length, do_lower_case, True)


def embedding_config_for(hf_config: Any, default_pooling: str) -> EmbeddingConfig:
    """The EmbeddingConfig of the directory `hf_config` was read from, else the defaults.

    Model classes are built from the HF config alone; transformers records where that config
    came from in `name_or_path`, which is where the sentence-transformers files sit too."""
    model_dir = getattr(hf_config, "name_or_path", "") or ""
    if model_dir and os.path.isdir(model_dir):
        return read_embedding_config(model_dir, default_pooling)
    return EmbeddingConfig(default_pooling, True)


def check_matryoshka_dimensions(hf_config: Any, model_path: str, dimensions: int) -> None:
    """SGLang's checks of a request's `dimensions`, in its order and words (ValueError = 400).
    A model is Matryoshka when its config lists `matryoshka_dimensions` or sets `is_matryoshka`
    (in config.json, or through --json-model-override-args)."""
    allowed = getattr(hf_config, "matryoshka_dimensions", None)
    if not (allowed or getattr(hf_config, "is_matryoshka", False)):
        raise ValueError(f"Model '{model_path}' does not support matryoshka representation, "
                         f"changing output dimensions will lead to poor results.")
    if dimensions < 1:
        raise ValueError("Requested dimensions must be greater than 0")
    if allowed and dimensions not in allowed:
        raise ValueError(f"Model '{model_path}' only supports {allowed} matryoshka dimensions, "
                         f"using other output dimensions will lead to poor results.")
    hidden = getattr(getattr(hf_config, "text_config", None) or hf_config, "hidden_size", None)
    if hidden is not None and dimensions > hidden:
        raise ValueError(f"Provided dimensions are greater than max embedding dimension: {hidden}")


def truncate_embedding(vector: list[float], dimensions: int, normalize: bool) -> list[float]:
    """The first `dimensions` values, L2-normalised again when the model normalises: the same
    vector as truncating before normalisation (SGLang's pooler), since scaling commutes."""
    head = [float(x) for x in vector[:dimensions]]
    if not normalize:
        return head
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head
