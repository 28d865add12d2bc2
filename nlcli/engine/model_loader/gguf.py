"""GGUF weights: indexed by gguf_file.py, dequantized by the `gguf` package, renamed to HF
checkpoint names.

llama.cpp's converter permutes the rows of q/k projections for the `llama` architecture (to its
interleaved rotary layout); we undo it so the HF rotate-half rotary code applies unchanged.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Architectures whose converter permuted q/k (see module docstring).
_PERMUTED_QK = {"llama", "mistral"}


def hf_name(gguf_name: str) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m:
        part = _LAYER.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{kind}" if part else None
    part = _GLOBAL.get(base)
    return f"{part}.{kind}" if part else None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(w, n_head): rows (head, half, pair) -> (head, pair, half)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    from nlcli.engine.model_loader.gguf_file import GGUFFile

    reader = GGUFFile(path)
    arch = reader.field("general.architecture") or getattr(hf_config, "model_type", "llama")
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        w = dequantize(t.data, t.qtype).reshape(t.shape)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            w = _unpermute(w, n_head if ".q_proj." in name else n_kv)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:  # unquantized tensors are views of the read-only file map
            w = w.copy()
        yield name, torch.from_numpy(w)
