"""Checking an update's checkpoint before any live weight changes: the same architecture, every
weight with the served model's shape (against transformers' own class built on the meta device;
the first mismatch in checkpoint order is reported in torch's words, read from the safetensors
headers before any data), no layers past the served model's, the same head counts, float weights
only, every weight present, and finally the model's own `load_weights` run on a meta-device twin,
so every name, shard and shape is checked without a second model in memory. Error texts follow
torch's and SGLang's wording, which clients and tests match exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Optional, Sequence

import torch

from nlcli.engine.configs.model_source import GGUF_ARCHITECTURES, ModelSource

logger = logging.getLogger(__name__)

# A decoder layer's tensors: `model.layers.3.mlp...` (or `layers.3...`); group 1 is the prefix.
_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)\.")

# float8 checkpoints hold scales our layers do not read: refused rather than loaded wrong.
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}


def checkpoint_config(source: ModelSource) -> dict:
    """The checkpoint's architectures and attention-head counts, as far as its files say: HF
    config.json (next to a single .safetensors file too), or the GGUF's metadata."""
    if source.format == "gguf":
        from nlcli.engine.model_loader.gguf_file import GGUFFile

        field = GGUFFile(source.weight_files[0]).field
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


def check_architecture(info: dict, served: list[str]) -> None:
    """The same architecture: another class names and lays out its weights differently."""
    new = list(info.get("architectures") or [])
    if new and served and not set(new) & set(served):
        raise ValueError(f"the checkpoint's architecture {new} differs from the served model's {list(served)}")


def check_head_counts(info: dict, hf_config: Any) -> None:
    """The same head counts: these change the math without changing any weight's shape, so the
    shape checks alone would let them through (run it after them: a checkpoint whose shapes
    differ is refused in torch's words, as SGLang's loader refuses it)."""
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


def checkpoint_shapes(source: ModelSource) -> Optional[list[tuple[str, tuple]]]:
    """(name, shape) of every tensor in load order, from the safetensors headers alone (no data
    read); None for GGUF, whose shapes are known only once converted."""
    if source.format != "safetensors":
        return None
    from safetensors import safe_open

    out = []
    for path in source.weight_files:
        with safe_open(path, framework="pt", device="cpu") as f:
            out += [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
    return out


def check_shapes(tensors: Iterable[tuple[str, Sequence[int]]], reference: dict[str, tuple],
                 num_layers: Optional[int]) -> None:
    """The first problem in checkpoint order, as SGLang's loader meets it: a tensor whose shape
    differs from the served parameter's (torch's own `copy_` wording), or tensors of layers the
    served model does not have."""
    tensors = list(tensors)
    extra = extra_layers_text([n for n, _ in tensors], num_layers)
    for name, shape in tensors:
        if extra and _layer_index(name) is not None and _layer_index(name) >= num_layers:
            raise ValueError(extra)
        want = reference.get(name)
        if want is not None and tuple(shape) != want:
            # The checkpoint's full shape (before any TP sharding): the sizes the user's files have.
            raise ValueError(_mismatch_text(want, tuple(shape), name))


def extra_layers_text(names: Iterable[str], num_layers: Optional[int]) -> Optional[str]:
    """What is extra when a checkpoint holds layers past the served model's `num_layers`, e.g.
    `the checkpoint has 3 layers, the served model 2: extra tensors model.layers.2.*`; else None."""
    if not num_layers:
        return None
    extra: dict[int, str] = {}
    for name in names:
        m = _LAYER.match(name)
        if m and int(m.group(2)) >= num_layers:
            extra.setdefault(int(m.group(2)), m.group(1))
    if not extra:
        return None
    idx = sorted(extra)
    shown = ", ".join(f"{extra[i]}{i}.*" for i in idx[:4]) + (", ..." if len(idx) > 4 else "")
    return f"the checkpoint has {idx[-1] + 1} layers, the served model {num_layers}: extra tensors {shown}"


def served_num_layers(hf_config: Any) -> Optional[int]:
    text = getattr(hf_config, "text_config", None) or hf_config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if n else None


def _layer_index(name: str) -> Optional[int]:
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


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
    check_shapes(((n, t.shape) for n, t in staged), shapes, served_num_layers(hf_config))
    names = {name for name, _ in staged}
    if names & set(shapes):  # else the checkpoint names weights its own way: the twin decides
        absent = sorted(min(g) for g in groups if not g & names)
        if absent:
            raise ValueError(_lacks(absent))
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
