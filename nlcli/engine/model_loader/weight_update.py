"""Hot weight updates (`/update_weights_from_disk`): swap a running model's weights for another
checkpoint of the same architecture, all or nothing.

Everything that can fail happens before the live parameters are touched: resolve the path and
confine it to `--weights-root` (weight_path.py), check the architecture, the shapes (from the
safetensors headers: a model of another size is refused in torch's words for its first mismatching
tensor), extra layers and head counts, read every tensor into memory, and validate it all on a
meta-device twin (weight_check.py). Only then are the tensors
copied in place (same storage, so CUDA graphs and the KV pool stay valid). If that copy still
fails, the original checkpoint is read back in. Messages follow SGLang's wording, which clients and
tests match exactly.

The caller (the scheduler) must run this with no request in flight and flush the radix cache on
success: cached K/V were computed by the old weights.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.model_loader.loader import iter_weights
from nlcli.engine.model_loader.weight_check import (check_architecture, check_head_counts,
                                                    check_shapes, checkpoint_config,
                                                    checkpoint_shapes, error_text,
                                                    reference_checkpoint, served_num_layers,
                                                    validate_on_meta)
from nlcli.engine.model_loader.weight_path import resolve_weight_source

if TYPE_CHECKING:
    from nlcli.engine.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

SUCCESS_MESSAGE = "Succeeded to update model weights."
ROLLBACK_SUFFIX = "\nRolling back to original weights."
LOAD_FORMATS = ("auto", "safetensors", "gguf")


class WeightUpdateResult(NamedTuple):
    success: bool
    message: str


def update_weights_from_disk(
    runner: ModelRunner, model_path: str, load_format: Optional[str] = None,
    server_args: Optional[ServerArgs] = None,
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
    staged = None
    try:
        source = resolve_weight_source(model_path, args, load_format)
        info = checkpoint_config(source)
        shapes = checkpoint_shapes(source)  # safetensors headers: no tensor data read yet
    except Exception as e:
        return _failed_iterator(model_path, e)
    try:
        check_architecture(info, runner.model_config.architectures)
    except Exception as e:
        return _failed_update(model_path, e)
    if shapes is None:  # GGUF: shapes are known once converted
        try:
            staged = list(iter_weights(source, hf_config))
        except Exception as e:
            return _failed_iterator(model_path, e)
        shapes = [(name, tuple(t.shape)) for name, t in staged]
    try:
        # Shapes first, as SGLang's loader meets them: a model of another size is refused in
        # torch's words for its first mismatching tensor; the config's head counts only decide
        # when every shape is equal.
        check_shapes(shapes, reference_checkpoint(hf_config)[0], served_num_layers(hf_config))
        check_head_counts(info, hf_config)
    except Exception as e:
        return _failed_update(model_path, e)
    try:
        staged = staged if staged is not None else list(iter_weights(source, hf_config))
    except Exception as e:
        return _failed_iterator(model_path, e)
    try:
        validate_on_meta(runner.model, hf_config, staged, runner.dtype)
    except Exception as e:
        return _failed_update(model_path, e)

    try:
        with torch.no_grad():
            runner.model.load_weights(iter(staged))
        runner.weights_changed()
    except Exception as e:
        logger.exception("Copying validated weights from %s failed; restoring the original ones", model_path)
        message = f"Failed to update weights: {error_text(e)}.{ROLLBACK_SUFFIX}"
        restored = restore_original_weights(runner)
        return WeightUpdateResult(False, message if restored is None else f"{message}\n{restored}")

    runner.source = source
    runner.server_args = runner.server_args.replace(model_path=model_path, load_format=load_format)
    logger.info("Updated weights from %s (%s, %d tensors) in %.1f s",
                model_path, source.format, len(staged), time.perf_counter() - start)
    return WeightUpdateResult(True, SUCCESS_MESSAGE)


def restore_original_weights(runner: ModelRunner) -> Optional[str]:
    """Re-read the checkpoint the runner last loaded successfully; None on success, else a line
    for the client saying the served weights may be mixed."""
    if runner.server_args.load_format == "dummy":
        logger.error("Cannot restore dummy weights after a failed update; the served weights are mixed")
        return "Rollback impossible (dummy weights); the served weights may be inconsistent."
    try:
        with torch.no_grad():
            runner.model.load_weights(iter_weights(runner.source, runner.model_config.hf_config))
    except Exception as e:
        runner.weights_changed()  # the dense weights serve whatever they now hold
        logger.exception("Restoring the original weights from %s failed", runner.source.model_path)
        return f"Rollback failed: {error_text(e)}; the served weights may be inconsistent."
    runner.weights_changed()
    logger.info("Restored the original weights from %s", runner.source.model_path)
    return None


def _failed_iterator(model_path: str, e: Exception) -> WeightUpdateResult:
    logger.warning("Weight update from %s refused: %s", model_path, e)
    return WeightUpdateResult(False, f"Failed to get weights iterator: {error_text(e)}.")


def _failed_update(model_path: str, e: Exception) -> WeightUpdateResult:
    logger.warning("Weight update from %s refused before any weight changed: %s", model_path, e)
    return WeightUpdateResult(False, f"Failed to update weights: {error_text(e)}.{ROLLBACK_SUFFIX}")
