"""The decoder-only transformer of the Llama family, in torch: Llama (incl. SmolLM2 and Llama 3.x
llama3 rope), Mistral, Qwen2 (qkv bias) and Qwen3 (per-head q/k RMSNorm); tied or untied
embeddings. Weight names follow the HF checkpoints; `load_weights` maps them onto the fused
qkv / gate_up projections and is reused for weight updates.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput
from nlcli.engine.layers.activation import SiluAndMul
from nlcli.engine.layers.attention import Attention
from nlcli.engine.layers.linear import (
    MergedColumnLinear,
    QKVLinear,
    RowLinear,
    VocabEmbedding,
    default_weight_loader,
)
from nlcli.engine.layers.logits import LogitsProcessor
from nlcli.engine.layers.norm import RMSNorm
from nlcli.engine.layers.rotary import RotaryEmbedding, get_rope

logger = logging.getLogger(__name__)

# checkpoint projection name -> (fused parameter name, shard id)
_STACKED = [
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
]


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, hidden_act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = RowLinear(intermediate, hidden, bias=bias)
        self.act_fn = SiluAndMul(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVLinear(hidden, self.head_dim, total_heads, total_kv, bias=qkv_bias)
        split = self.qkv_proj.split  # this TP rank's heads, possibly an uneven share
        self.num_heads, self.num_kv_heads = split.q_count, split.kv_count
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowLinear(total_heads * self.head_dim, hidden, bias=o_bias,
                                in_range=(split.q_start * self.head_dim, self.q_size))
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # one table shared by every layer
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id)

    def forward(self, cos_sin, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """cos_sin: the forward's rotary rows (RotaryEmbedding.cos_sin), gathered once."""
        T, qk_size, heads = x.shape[0], self.q_size + self.kv_size, self.num_heads
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused projection: one [T, H + Hkv, D] block, rotated at once.
        qk = qkv[:, :qk_size].view(T, heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = self.rotary_emb.rotate(qk, cos_sin)
        return self.o_proj(self.attn(qk[:, :heads], qk[:, heads:], qkv[:, qk_size:], batch))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, qkv_bias, o_bias, qk_norm, rotary_emb)
        self.mlp = LlamaMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, getattr(config, "mlp_bias", False)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, cos_sin, hidden, residual, batch):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = get_rope(config, head_dim, config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, o_bias, qk_norm, self.rotary_emb)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, batch):
        hidden, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)  # once, not per layer
        for layer in self.layers:
            hidden, residual = layer(cos_sin, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Per-family attention details; subclasses override.
    qk_norm = False
    # EngineModel (models/base.py): rotary positions have no table to run past.
    uses_kv_cache = True
    max_positions: Optional[int] = None

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.qkv_bias(config), self.o_bias(config), self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.pooler = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> LogitsOutput:
        return self.logits(self.model(input_ids, positions, batch), batch)

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> LogitsOutput:
        """The decoder body's output -> logits (model_executor/compile_runner.py runs the body
        compiled and this eagerly)."""
        return self.logits_processor(hidden, self.lm_head_weight, batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the parameter names set.

        Tensors arrive one at a time so a whole checkpoint never sits in memory twice."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or name.startswith("rope_freqs"):
                continue  # recomputed from the config
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for ckpt, fused, shard in _STACKED:
                if f".{ckpt}." in name:
                    target = name.replace(f".{ckpt}.", f".{fused}.")
                    param = params[target]
                    param.weight_loader(param, tensor.to(param.dtype), shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    logger.debug("skipping checkpoint tensor %s (no such parameter)", name)
                    continue
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor.to(param.dtype))
                loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    def qkv_bias(self, config) -> bool:
        return True

    def o_bias(self, config) -> bool:
        return False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
