"""BERT-family encoders (BertModel, RobertaModel, XLMRobertaModel) for embedding servers.

The batch is packed like an extend batch: every sequence's tokens back to back, with per-sequence
lengths. Attention is bidirectional within a sequence and never crosses sequences; there is no KV
cache, since an encoder reads each input once. The model ends in a `Pooler` configured from the
checkpoint's sentence-transformers files (see `nlcli.engine.configs.embedding_config`).
The layers' linears are tensor-parallel (heads and the MLP split across ranks, two all-reduces per
layer); the embeddings and LayerNorms are whole on every rank.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nlcli.engine.configs.embedding_config import EmbeddingConfig, embedding_config_for
from nlcli.engine.layers.linear import ColumnLinear, QKVLinear, RowLinear
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput, Pooler

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def padding_mask(lengths: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    """`[bs, max_len]` True where a padded row holds a real token; None for a single sequence."""
    if len(lengths) == 1:
        return None
    lens = torch.tensor(list(lengths), device=device)
    return torch.arange(max(lengths), device=device)[None, :] < lens[:, None]


def encoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor]
) -> torch.Tensor:
    """Bidirectional attention per sequence over packed `[num_tokens, heads, head_dim]` tensors.

    Sequences are scattered into a padded `[bs, heads, max_len, head_dim]` block so one fused SDPA
    call serves the batch; padded keys are masked out, padded query rows are discarded.
    """
    if valid is None:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        )
        return out[0].transpose(0, 1)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*valid.shape, *x.shape[1:])
        out[valid] = x  # row-major order of `valid` is exactly the packed order
        return out.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), attn_mask=valid[:, None, None, :]
    )
    return out.transpose(1, 2)[valid]


class BertEmbeddings(nn.Module):
    def __init__(self, config, position_offset: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # RoBERTa numbers positions from padding_idx + 1.
        self.position_offset = position_offset

    def forward(self, input_ids, positions, token_type_ids):
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        heads = config.num_attention_heads
        self.head_dim = hidden // heads
        # Fused query/key/value, one matmul; under TP this rank's heads only.
        self.qkv_proj = QKVLinear(hidden, self.head_dim, heads, heads, bias=True)
        self.num_heads = self.qkv_proj.split.q_count
        self.attn_out = RowLinear(hidden, hidden, bias=True, in_range=(
            self.qkv_proj.split.q_start * self.head_dim, self.num_heads * self.head_dim))
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = ColumnLinear(hidden, config.intermediate_size, bias=True)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.output = RowLinear(config.intermediate_size, hidden, bias=True)
        self.out_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        attn = encoder_attention(q, k, v, valid).reshape(x.shape[0], self.num_heads * self.head_dim)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


# HF parameter names inside one encoder layer -> (our parameter, qkv shard id or None).
_LAYER_NAMES = {
    "attention.self.query": ("qkv_proj", "q"),
    "attention.self.key": ("qkv_proj", "k"),
    "attention.self.value": ("qkv_proj", "v"),
    "attention.output.dense": ("attn_out", None),
    "attention.output.LayerNorm": ("attn_norm", None),
    "intermediate.dense": ("intermediate", None),
    "output.dense": ("output", None),
    "output.LayerNorm": ("out_norm", None),
}
# Checkpoint parts an embedding server does not use (MLM / NSP heads, the tanh pooler, buffers).
_SKIPPED = ("pooler.", "cls.", "lm_head.", "classifier.")


class BertModel(nn.Module):
    """Encoder + pooler. `forward` returns one pooled embedding per sequence."""

    default_pooling = "cls"  # SGLang's default when no sentence-transformers files say otherwise
    # The scheduler reads this: no radix-cache reuse and no chunked prefill for this model (each
    # input must be encoded whole, in one forward), and the runner needs no KV pool for it.
    uses_kv_cache = False
    weight_prefixes = ("bert.",)

    def __init__(self, config, embedding_config: Optional[EmbeddingConfig] = None):
        super().__init__()
        self.config = config
        self.embedding_config = embedding_config or embedding_config_for(config, self.default_pooling)
        self.embeddings = BertEmbeddings(config, self._position_offset(config))
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(self.embedding_config.pooling, self.embedding_config.normalize)
        # Longest input the position table allows (RoBERTa numbers from padding_idx + 1).
        self.max_positions = config.max_position_embeddings - self.embeddings.position_offset
        self.requires_grad_(False)  # inference only, like the decoder's parameters

    @staticmethod
    def _position_offset(config) -> int:
        return 0

    def encode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        lengths: Sequence[int],
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Packed token states `[num_tokens, hidden]` (the HF `last_hidden_state`, unpadded)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids)
        valid = padding_mask(lengths, x.device)
        for layer in self.layers:
            x = layer(x, valid)
        return x

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> EmbeddingPoolerOutput:
        if any(forward_batch.prefix_lens_cpu):
            # Bidirectional states of a prefix change with what follows: nothing can be reused.
            raise ValueError("encoder models cannot extend a cached prefix")
        lengths = forward_batch.extend_lens_cpu
        return self.pooler(self.encode(input_ids, positions, lengths, token_type_ids), lengths)

    def _strip(self, name: str) -> str:
        for prefix in self.weight_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors in; returns the names of the parameters fully loaded.

        Unknown names and wrong shapes raise: an embedding checkpoint of another shape must not
        load half-way silently. The caller compares the returned set with `named_parameters()`."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = self._strip(hf_name)
            if name.startswith(_SKIPPED) or name.endswith("position_ids"):
                continue
            shard = None
            if name.startswith("encoder.layer."):
                _, _, idx, rest = name.split(".", 3)
                module, _, kind = rest.rpartition(".")
                if module not in _LAYER_NAMES:
                    raise KeyError(f"unexpected weight {hf_name!r}")
                ours, shard = _LAYER_NAMES[module]
                name = f"layers.{idx}.{ours}.{_norm_kind(kind)}"
            else:
                module, _, kind = name.rpartition(".")
                name = f"{module}.{_norm_kind(kind)}"
            if name not in params:
                raise KeyError(f"unexpected weight {hf_name!r}")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is not None:  # a parallel linear: it slices this rank's part and checks
                loader(param, tensor.to(param.dtype), shard)
            else:
                _check_shape(param.data, tensor, hf_name)
                param.data.copy_(tensor)
            loaded.add(name if shard is None else f"{name}#{shard}")
        # A fused qkv parameter counts as loaded once all three of its shards are.
        done = {n for n in loaded if "#" not in n}
        done |= {n for n in params if all(f"{n}#{s}" in loaded for s in "qkv")}
        return done


def _check_shape(target: torch.Tensor, tensor: torch.Tensor, hf_name: str) -> None:
    if target.shape == tensor.shape:
        return
    # A meta-device copy raises torch's own size-mismatch message (the one /update_weights
    # reports) without touching memory; shapes that merely broadcast are refused as well.
    torch.empty(target.shape, device="meta").copy_(tensor.to("meta"))
    raise RuntimeError(
        f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
    )


def _norm_kind(kind: str) -> str:
    # Very old BERT checkpoints name LayerNorm parameters gamma/beta.
    return {"gamma": "weight", "beta": "bias"}.get(kind, kind)


class RobertaModel(BertModel):
    """RoBERTa / XLM-R: BERT with positions offset by padding_idx + 1 (e5, bge-m3)."""

    weight_prefixes = ("roberta.",)

    @staticmethod
    def _position_offset(config) -> int:
        return config.pad_token_id + 1


class XLMRobertaModel(RobertaModel):
    pass

