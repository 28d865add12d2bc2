"""Loading a model: build our class for the config, then fill it from safetensors or GGUF.

Weights come only from safetensors (memory-mapped) or GGUF (dequantized); never from pickles.
`iter_weights` yields (HF name, tensor) pairs that a model's `load_weights` consumes, the same path
weight updates take.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterator

import torch

from nlcli.engine.configs.model_config import ModelConfig
from nlcli.engine.configs.model_source import ModelSource
from nlcli.engine.model_loader.weight_check import (checkpoint_shapes, extra_layers_text,
                                                    served_num_layers)
from nlcli.engine.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_weights(source: ModelSource, hf_config=None) -> Iterator[tuple[str, torch.Tensor]]:
    if source.format == "gguf":
        from nlcli.engine.model_loader.gguf import iter_gguf_weights

        return iter_gguf_weights(source.weight_files[0], hf_config or source.hf_config())
    return iter_safetensors(source.weight_files)


def load_model(
    model_config: ModelConfig,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
) -> torch.nn.Module:
    cls = resolve_model_class(model_config.architectures, is_embedding=not model_config.is_generation)
    start = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(model_config.hf_config)
    finally:
        torch.set_default_dtype(prev)
    if load_format == "dummy":
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    else:
        if load_format not in ("auto", source.format):
            raise ValueError(f"--load-format {load_format} does not match the model's files ({source.format})")
        check_extra_layers(source, model_config.hf_config)
        loaded = model.load_weights(with_progress(iter_weights(source, model_config.hf_config)))
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise RuntimeError(f"checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
    model.eval()
    logger.info(
        "Loaded %s (%s, %s) in %.1f s, %.1f MiB of weights",
        cls.__name__, source.format, str(dtype).replace("torch.", ""),
        time.perf_counter() - start, weight_bytes(model) / 2**20,
    )
    return model


def check_extra_layers(source: ModelSource, hf_config) -> None:
    """Refuse tensors of layers past the config's, saying which (the model's own loader would
    name one tensor it has no parameter for). Read from the safetensors headers: no data."""
    shapes = checkpoint_shapes(source)
    extra = extra_layers_text([n for n, _ in shapes or ()], served_num_layers(hf_config))
    if extra:
        raise ValueError(f"{source.model_path}: {extra}")


def with_progress(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A progress display on stderr while tensors load, only for a person at a terminal: never
    in logs, pipes or CI (NL_NO_PROGRESS=1 turns it off there too)."""
    if not sys.stderr.isatty() or os.environ.get("NL_NO_PROGRESS"):
        yield from weights
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("Loading weights"), BarColumn(), TextColumn("{task.completed} tensors"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("load", total=None)
        for item in weights:
            yield item
            bar.advance(task)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
