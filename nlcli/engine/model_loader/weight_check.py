"""Checking an update's checkpoint before any live weight changes: the same architecture and head
counts, float weights only, every weight present with the served model's shape (against
transformers' own class built on the meta device), and finally the model's own `load_weights` run
on a meta-device twin, so every name, shard and shape is checked without a second model in memory.
Error texts follow torch's and SGLang's wording, which clients and tests match exactly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from nlcli.engine.configs.model_source import GGUF_ARCHITECTURES, ModelSource

logger = logging.getLogger(__name__)

# float8 checkpoints hold scales our layers do not read: refused rather than loaded wrong.
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}


def checkpoint_config(source: ModelSource) -> dict:
    """The checkpoint's architectures and attention-head counts, as far as its files say: HF
    config.json (next to a single .safetensors file too), or the GGUF's metadata."""
    if source.format == "gguf":
        import gguf

        reader = gguf.GGUFReader(source.weight_files[0])

        def field(key: str):
            f = reader.fields.get(key)
            return f.contents() if f is not None else None

        arch = field("general.architecture")
        return {
            "architectures": [GGUF_ARCHITECTURES.get(arch, f"gguf:{arch}")] if arch else [],
            "num_attention_heads": field(f"{arch}.attention.head_count"),
            "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        }
    path = os.path.join(source.local_dir, "config.json")
    if not os.path.isfile(path):
        return {}  # a lone .safetensors file: names and shapes decide
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    text = cfg.get("text_config") or cfg
    return {
        "architectures": cfg.get("architectures") or [],
        "num_attention_heads": text.get("num_attention_heads"),
        "num_key_value_heads": text.get("num_key_value_heads"),
    }


def check_architecture(info: dict, served: list[str], hf_config: Any) -> None:
    """Same architecture, and the same head counts: these change the math without changing any
    weight's shape, so the shape checks alone would let them through."""
    new = list(info.get("architectures") or [])
    if new and served and not set(new) & set(served):
        raise ValueError(f"the checkpoint's architecture {new} differs from the served model's {list(served)}")
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = getattr(text, "num_attention_heads", None)
    served_counts = {"num_attention_heads": heads,
                     "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads}
    new_counts = dict(info)
    if new_counts.get("num_attention_heads") and not new_counts.get("num_key_value_heads"):
        new_counts["num_key_value_heads"] = new_counts["num_attention_heads"]
    for key, value in served_counts.items():
        theirs = new_counts.get(key)
        if theirs is not None and value is not None and int(theirs) != int(value):
            raise ValueError(f"the checkpoint has {key}={theirs}, the served model {value}")


def validate_on_meta(model: torch.nn.Module, hf_config: Any, staged: list, dtype: torch.dtype) -> None:
    """Run the model's own `load_weights` on a meta-device twin built from the same config: the
    same name mapping, fusing, TP slicing and shape checks as the real load, with no memory and
    no effect on the live model. Raises on the first problem, in checkpoint order."""
    for name, tensor in staged:
        if tensor.dtype in _FLOAT8 or (
            not tensor.is_floating_point() and name.endswith((".weight", ".bias"))
        ):
            raise ValueError(f"{name} is stored as {str(tensor.dtype).replace('torch.', '')}; "
                             "only float32, float16 and bfloat16 checkpoints can update weights")
    shapes, groups = reference_checkpoint(hf_config)
    names = {name for name, _ in staged}
    if names & set(shapes):  # else the checkpoint names weights its own way: the twin decides
        absent = sorted(min(g) for g in groups if not g & names)
        if absent:
            raise ValueError(_lacks(absent))
    for name, tensor in staged:
        want = shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            # Checked against the checkpoint's full shape (before any TP sharding), so the
            # message names the sizes the user's checkpoint actually has.
            raise ValueError(_mismatch_text(want, tuple(tensor.shape), name))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            twin = type(model)(hf_config)
    finally:
        torch.set_default_dtype(prev)
    try:
        loaded = twin.load_weights(iter(staged))
    except (ValueError, RuntimeError) as e:
        raise ValueError(error_text(e)) from e
    missing = sorted(set(dict(twin.named_parameters())) - set(loaded))
    if missing:
        raise ValueError(_lacks(missing))


def _lacks(names: list[str]) -> str:
    return f"the checkpoint lacks {len(names)} weight(s): " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def reference_checkpoint(hf_config: Any) -> tuple[dict[str, tuple], list[set[str]]]:
    """What a checkpoint of the served model holds, from transformers' own class for its
    architecture built on the meta device (no memory): name -> full (unsharded) shape, and the
    groups of names of which one must be present (tied weights share one group). Our fused
    parameters count as loaded once any shard arrives, so completeness is checked by name here.
    Empty if transformers lacks the class."""
    import transformers

    for arch in getattr(hf_config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                ref = cls(hf_config)
        except Exception as e:  # a config transformers cannot build: the loaders' checks remain
            logger.debug("no reference shapes from transformers.%s: %s", arch, e)
            continue
        state = ref.state_dict(keep_vars=True)
        groups: dict[int, set[str]] = {}
        for name, t in state.items():
            groups.setdefault(id(t), set()).add(name)
        return {name: tuple(t.shape) for name, t in state.items()}, list(groups.values())
    return {}, []


def _mismatch_text(live: tuple, ckpt: tuple, name: str) -> str:
    """What torch's `live_param.copy_(checkpoint_tensor)` says about these shapes."""
    try:
        torch.empty(live, device="meta").copy_(torch.empty(ckpt, device="meta"))
    except RuntimeError as e:
        return error_text(e)
    return f"{name} has shape {list(ckpt)}, the served model {list(live)}"  # merely broadcastable


def error_text(e: Exception) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.rstrip(".") or type(e).__name__
