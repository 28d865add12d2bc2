"""CpuDecodeRunner: decode steps of a Llama-family model run as one call into nl's C kernels
(cpu_kernels/csrc/decode_step.c) instead of a few hundred torch ops.

A small model's decode step on the CPU is mostly per-op cost, not arithmetic: at batch 1 the
embedded SmolLM2's 30 layers take ~20 ops each, and each op pays a dispatch, an allocation and an
OpenMP fork-join. The C step runs every layer in one parallel region over the same quantized
weights the per-op path uses (layers/quantization's Q4_1 / Q8_0 blocks), the same KV pool and the
same rotary table; only the lm_head and sampling stay in torch (model.logits).

It takes over where everything it needs holds, and is skipped otherwise (the per-op path runs):
- CPU, float32 or bfloat16 weights and KV pool (activations are float32 inside the step either
  way, as the block kernels take them), one tensor-parallel rank, no --enable-torch-compile;
- a Llama, Mistral or Qwen2 decoder (no per-head q/k norm), SiLU MLP, full-width rotary;
- every decoder matrix on nl's C block kernels (`--quantization` gguf, int8 or int4, or auto
  where it picked them), and no bias but the qkv one;
- per step: a decode-only batch of at most `max_rows` requests: the quantization plan's row count
  (where one quantized matmul stops beating the dense one), raised by the start-up measurement of
  whole steps (cpu_decode_limit.py); the per-op path runs larger batches on the dense matmuls.
`refresh()` rebuilds the descriptors after the weights change (their pointers move).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Optional

import torch

from nlcli.cpu_kernels import ops
from nlcli.engine.forward_batch import ForwardBatch, ForwardMode, LogitsOutput
from nlcli.engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Layer(ctypes.Structure):
    """decode_step.c's nl_layer."""
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("qkv", ops.Matrix), ("o", ops.Matrix),
                ("gate_up", ops.Matrix), ("down", ops.Matrix), ("k_buf", _P), ("v_buf", _P)]


class _Model(ctypes.Structure):
    """decode_step.c's nl_model."""
    _fields_ = [("n_layers", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64),
                ("head_dim", _I64), ("inter", _I64), ("eps", _F32), ("scale", _F32),
                ("embed_bf16", _I64), ("kv_bf16", _I64), ("embed", _P), ("final_norm", _P),
                ("cos_sin", _P), ("layers", ctypes.POINTER(_Layer))]


def _matrix(linear) -> Optional[ops.Matrix]:
    method = linear.method
    if getattr(method, "c_kind", None) is None:
        return None
    return ops.matrix(method.blocks, method.c_kind, linear.bias)


def why_not(model, kv_pool, server_args) -> Optional[str]:
    """Why the C decode step cannot serve this model (None: it can)."""
    if (not isinstance(model, LlamaForCausalLM)
            or type(model).forward is not LlamaForCausalLM.forward):
        return "not a Llama-family decoder"
    if model.qk_norm:
        return "per-head q/k norm"
    if server_args.tp_size > 1 or server_args.enable_torch_compile:
        return "tensor parallelism or torch.compile"
    if kv_pool.device.type != "cpu" or kv_pool.dtype not in ops.KV_DTYPES:
        return "not a float32 or bfloat16 CPU KV pool"
    body = model.model
    if body.embed_tokens.weight.dtype not in ops.KV_DTYPES:
        return "not float32 or bfloat16 weights"
    rope = body.rotary_emb
    if rope.rotary_dim != rope.head_dim or rope.head_dim % 2 or rope.head_dim > 512:
        return "partial rotary or head_dim over 512"
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if mlp.act_fn.act is not torch.nn.functional.silu:
            return "not a SiLU MLP"
        if any(lin.bias is not None for lin in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            return "biases beyond qkv"
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if getattr(lin.method, "c_kind", None) is None:
                return ("matrices not on nl's C block kernels "
                        "(--quantization none, or no C compiler)")
    if not ops.available():
        return f"nl CPU kernels unavailable: {ops.unavailable_reason()}"
    return None


class CpuDecodeRunner:
    def __init__(self, model, req_to_token_pool, kv_pool, max_rows: int):
        self.model, self.req_to_token_pool, self.kv_pool = model, req_to_token_pool, kv_pool
        self.max_rows = max_rows
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the descriptors from the live weights and their quantized copies."""
        body, cfg = self.model.model, self.model.config
        layers = (_Layer * len(body.layers))()
        # float32 views of the small tables (copies only for a bfloat16 model); kept alive here.
        self.tables = [t.float().contiguous() for layer in body.layers for t in
                       (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        self.tables += [body.norm.weight.float().contiguous(),
                        body.rotary_emb.cos_sin_cache.float().contiguous()]
        for i, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            k_buf, v_buf = self.kv_pool.get_kv_buffer(i)
            layers[i] = _Layer(self.tables[2 * i].data_ptr(), self.tables[2 * i + 1].data_ptr(),
                               _matrix(attn.qkv_proj), _matrix(attn.o_proj),
                               _matrix(mlp.gate_up_proj), _matrix(mlp.down_proj),
                               k_buf.data_ptr(), v_buf.data_ptr())
        attn0 = body.layers[0].self_attn
        embed = body.embed_tokens.weight
        self.hidden, self.dtype = cfg.hidden_size, embed.dtype
        self.vocab, self.max_position = embed.shape[0], body.rotary_emb.cos_sin_cache.shape[0]
        self.layers = layers  # the model struct points into it
        self.desc = _Model(len(body.layers), cfg.hidden_size, attn0.num_heads, attn0.num_kv_heads,
                           attn0.head_dim, body.layers[0].mlp.down_proj.weight.shape[1],
                           body.norm.eps, attn0.attn.scaling, embed.dtype == torch.bfloat16,
                           self.kv_pool.dtype == torch.bfloat16, embed.data_ptr(),
                           self.tables[-2].data_ptr(), self.tables[-1].data_ptr(), layers)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode batch small enough, whose token ids and positions index the tables: C reads
        them unchecked, and the per-op path raises a clean error for a bad one instead."""
        if batch.forward_mode != ForwardMode.DECODE or not 0 < batch.batch_size <= self.max_rows:
            return False
        ids, pos = batch.input_ids, batch.positions
        return (0 <= int(ids.min()) and int(ids.max()) < self.vocab
                and 0 <= int(pos.min()) and int(pos.max()) < self.max_position)

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        ids, pos, loc = (_i64(t) for t in (batch.input_ids, batch.positions, batch.out_cache_loc))
        rows, lens = _i64(batch.req_pool_indices), _i64(batch.seq_lens)
        r2t = self.req_to_token_pool.req_to_token
        hidden = torch.empty(batch.batch_size, self.hidden)
        ops.lib().nl_decode_step(ctypes.byref(self.desc), ids.data_ptr(), pos.data_ptr(),
                                 loc.data_ptr(), r2t.data_ptr(), r2t.shape[1], rows.data_ptr(),
                                 lens.data_ptr(), batch.batch_size, hidden.data_ptr(),
                                 torch.get_num_threads())
        return self.model.logits(hidden.to(self.dtype), batch)


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def create_cpu_decode_runner(server_args, model, req_to_token_pool, kv_pool,
                             quant_plan) -> Optional[CpuDecodeRunner]:
    if kv_pool is None or quant_plan.max_rows < 1:
        return None
    why = why_not(model, kv_pool, server_args)
    if why is not None:
        logger.info("Decode: per-op torch path (C decode step off: %s)", why)
        return None
    return CpuDecodeRunner(model, req_to_token_pool, kv_pool, quant_plan.max_rows)
