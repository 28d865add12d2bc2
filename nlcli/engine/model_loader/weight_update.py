"""Hot weight updates (`/update_weights_from_disk`): swap a running model's weights for another
checkpoint of the same architecture, all or nothing.

Everything that can fail happens before the live parameters are touched: resolve the path (and
confine it to `--weights-root`), check the architecture, read every tensor into memory, then run the
model's own `load_weights` on a meta-device twin so every name, shard and shape is checked without
allocating a second model. Only then are the tensors copied in place (same storage, so CUDA graphs
and the KV pool stay valid). If that copy still fails, the original checkpoint is read back in.
Messages follow SGLang's wording, which clients and tests match exactly.

The caller (the scheduler) must run this with no request in flight and flush the radix cache on
success: cached K/V were computed by the old weights.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import time
from typing import Any, NamedTuple, Optional

import torch

from nlcli.engine.model_loader.loader import iter_weights
from nlcli.engine.configs.model_source import GGUF_ARCHITECTURES, ModelSource, resolve_model_source

logger = logging.getLogger(__name__)

SUCCESS_MESSAGE = "Succeeded to update model weights."
ROLLBACK_SUFFIX = "\nRolling back to original weights."
LOAD_FORMATS = ("auto", "safetensors", "gguf")

# A Hub repo id ("org/name" or a bare legacy "name"); anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# The shape check in layers/linear.py words mismatches its own way; clients expect torch's.
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}


class WeightUpdateResult(NamedTuple):
    success: bool
    message: str


class WeightPathError(ValueError):
    """The requested checkpoint cannot be used; the message names the path and the reason."""


def update_weights_from_disk(
    runner: Any, model_path: str, load_format: Optional[str] = None, server_args: Any = None
) -> WeightUpdateResult:
    """Load `model_path` into `runner.model` in place; on any failure the old weights stay served.

    `server_args` supplies `weights_root`, `allow_remote_weights` and `download_dir` (default: the
    runner's). On success `runner.server_args.model_path` / `.load_format` and `runner.source`
    name the new checkpoint; on failure nothing about the runner changes."""
    args = server_args or runner.server_args
    start = time.perf_counter()
    if load_format is None:  # SGLang: defaults to the server's current one
        load_format = "auto" if runner.server_args.load_format == "dummy" else runner.server_args.load_format
    if load_format not in LOAD_FORMATS:
        return WeightUpdateResult(
            False, f"Failed to get model loader: load format {load_format!r} cannot update weights "
            f"(use {', '.join(LOAD_FORMATS)})."
        )
    hf_config = runner.model_config.hf_config
    try:
        source = resolve_weight_source(model_path, args, load_format)
        info = checkpoint_config(source)
    except Exception as e:
        return _failed_iterator(model_path, e)
    try:
        check_architecture(info, runner.model_config.architectures, hf_config)
    except Exception as e:
        return _failed_update(model_path, e)
    try:
        staged = list(iter_weights(source, hf_config))
    except Exception as e:
        return _failed_iterator(model_path, e)
    try:
        validate_on_meta(runner.model, hf_config, staged, runner.dtype)
    except Exception as e:
        return _failed_update(model_path, e)

    try:
        with torch.no_grad():
            runner.model.load_weights(iter(staged))
    except Exception as e:
        logger.exception("Copying validated weights from %s failed; restoring the original ones", model_path)
        message = f"Failed to update weights: {_text(e)}.{ROLLBACK_SUFFIX}"
        restored = restore_original_weights(runner)
        return WeightUpdateResult(False, message if restored is None else f"{message}\n{restored}")

    runner.source = source
    runner.server_args = runner.server_args.replace(model_path=model_path, load_format=load_format)
    logger.info("Updated weights from %s (%s, %d tensors) in %.1f s",
                model_path, source.format, len(staged), time.perf_counter() - start)
    return WeightUpdateResult(True, SUCCESS_MESSAGE)


def resolve_weight_source(model_path: str, server_args: Any, load_format: str = "auto") -> ModelSource:
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
        if not getattr(server_args, "allow_remote_weights", False):
            raise WeightPathError(
                f"{model_path} does not exist locally; Hub repo ids need --allow-remote-weights"
            )
        source = resolve_model_source(model_path, download_dir=getattr(server_args, "download_dir", None))
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
        raise ValueError(_text(e)) from e
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
        return _text(e)
    return f"{name} has shape {list(ckpt)}, the served model {list(live)}"  # merely broadcastable


def restore_original_weights(runner: Any) -> Optional[str]:
    """Re-read the checkpoint the runner last loaded successfully; None on success, else a line
    for the client saying the served weights may be mixed."""
    if runner.server_args.load_format == "dummy":
        logger.error("Cannot restore dummy weights after a failed update; the served weights are mixed")
        return "Rollback impossible (dummy weights); the served weights may be inconsistent."
    try:
        with torch.no_grad():
            runner.model.load_weights(iter_weights(runner.source, runner.model_config.hf_config))
    except Exception as e:
        logger.exception("Restoring the original weights from %s failed", runner.source.model_path)
        return f"Rollback failed: {_text(e)}; the served weights may be inconsistent."
    logger.info("Restored the original weights from %s", runner.source.model_path)
    return None


def _failed_iterator(model_path: str, e: Exception) -> WeightUpdateResult:
    logger.warning("Weight update from %s refused: %s", model_path, e)
    return WeightUpdateResult(False, f"Failed to get weights iterator: {_text(e)}.")


def _failed_update(model_path: str, e: Exception) -> WeightUpdateResult:
    logger.warning("Weight update from %s refused before any weight changed: %s", model_path, e)
    return WeightUpdateResult(False, f"Failed to update weights: {_text(e)}.{ROLLBACK_SUFFIX}")


def _text(e: Exception) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.rstrip(".") or type(e).__name__
