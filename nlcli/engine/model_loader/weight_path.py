"""Where an update's checkpoint lives: an HF directory, one .safetensors or .gguf file, or (only
with --allow-remote-weights) a Hub repo id, confined to --weights-root when one is set.

Paths are confined before their existence is tested, so a refusal says nothing about files outside
the root. Pickled weights are never accepted.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Optional

from nlcli.engine.args import ServerArgs
from nlcli.engine.configs.model_source import ModelSource, resolve_model_source

# A Hub repo id ("org/name" or a bare legacy "name"); anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class WeightPathError(ValueError):
    """The requested checkpoint cannot be used; the message names the path and the reason."""


def resolve_weight_source(model_path: str, server_args: ServerArgs,
                          load_format: str = "auto") -> ModelSource:
    """An HF directory, one .safetensors file, one .gguf file, or (only with
    --allow-remote-weights) a Hub repo id. With --weights-root, relative paths are taken under it
    and the real path, and every weight file's real path, must lie inside it."""
    if not isinstance(model_path, str) or not model_path.strip():
        raise WeightPathError("model_path is empty")
    root = os.path.realpath(os.path.expanduser(server_args.weights_root)) if server_args.weights_root else None
    expanded = os.path.expanduser(model_path)
    candidate = expanded if os.path.isabs(expanded) or root is None else os.path.join(root, expanded)
    # Confine before testing existence, so the answer says nothing about files outside the root.
    _confine(os.path.realpath(candidate), root, model_path)
    if os.path.exists(candidate):
        source = _local_source(model_path, os.path.realpath(candidate))
        for f in source.weight_files + [os.path.join(source.local_dir, "config.json")]:
            if os.path.exists(f):
                _confine(os.path.realpath(f), root, model_path)
    elif _HUB_ID.fullmatch(model_path) and ".." not in model_path:
        if not server_args.allow_remote_weights:
            raise WeightPathError(
                f"{model_path} does not exist locally; Hub repo ids need --allow-remote-weights"
            )
        source = resolve_model_source(model_path, download_dir=server_args.download_dir)
    else:
        raise WeightPathError(f"{model_path} does not exist")
    if load_format not in ("auto", source.format):
        raise WeightPathError(f"{model_path} holds {source.format} weights, not {load_format}")
    return source


def _confine(real: str, root: Optional[str], model_path: str) -> None:
    if root is not None and os.path.commonpath([real, root]) != root:
        raise WeightPathError(f"{model_path} is outside --weights-root")


def _local_source(model_path: str, real: str) -> ModelSource:
    if os.path.isfile(real):
        if real.endswith(".gguf"):
            return ModelSource(model_path, os.path.dirname(real), [real], "gguf")
        if real.endswith(".safetensors"):
            return ModelSource(model_path, os.path.dirname(real), [real], "safetensors")
        raise WeightPathError(
            f"{model_path} is not a .safetensors or .gguf file (pickled weights are never loaded)"
        )
    if not os.path.isfile(os.path.join(real, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(real, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource(model_path, real, ggufs, "gguf")
    # Never builds a GGUF cache here: the directory has a config.json or is refused.
    return dataclasses.replace(resolve_model_source(real), model_path=model_path)
