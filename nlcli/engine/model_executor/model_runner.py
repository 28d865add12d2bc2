"""ModelRunner: owns the weights, the KV pools and the attention backend of one engine rank, and
runs one forward per ForwardBatch.

Set-up reads top to bottom in `__init__`: threads and seed, the model's source and config, device
and dtype (model_executor/device.py), the weights, then the pools. Order matters: free memory is
measured before the weights load, so the KV pool gets `mem_fraction_static` of it minus what the
weights took (or exactly `--max-total-tokens`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.configs.config_overrides import parse_model_overrides
from nlcli.engine.configs.model_config import ModelConfig
from nlcli.engine.configs.model_source import ModelSource, resolve_model_source
from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput
from nlcli.engine.layers.attention import create_attn_backend
from nlcli.engine.mem_cache.pool import (
    ReqToTokenPool,
    TokenToKVPool,
    TokenToKVPoolAllocator,
    available_memory_bytes,
    profile_max_num_tokens,
)
from nlcli.engine.model_executor.compile_runner import create_compile_runner
from nlcli.engine.model_executor.cuda_graph_runner import create_cuda_graph_runner
from nlcli.engine.model_executor.device import apply_cpu_threads, choose_device_and_dtype
from nlcli.engine.model_loader.loader import load_model, weight_bytes

if TYPE_CHECKING:
    from nlcli.engine.layers.pooler import EmbeddingPoolerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, server_args: ServerArgs, source: Optional[ModelSource] = None):
        self.server_args = server_args
        apply_cpu_threads(server_args.num_threads)
        if server_args.random_seed is not None:
            torch.manual_seed(server_args.random_seed)
        self.source = source or resolve_model_source(
            server_args.model_path, server_args.is_embedding, server_args.revision,
            server_args.download_dir, parse_model_overrides(server_args.json_model_override_args)
        )
        self.model_config = ModelConfig.from_source(
            self.source, server_args.context_length, server_args.is_embedding
        )
        self.device, self.dtype = choose_device_and_dtype(
            server_args.device, server_args.dtype, self.model_config.hf_config
        )
        free_before = available_memory_bytes(self.device)
        start = time.perf_counter()
        self.model = load_model(self.model_config, self.source, self.dtype, self.device, server_args.load_format)
        self.weight_bytes = weight_bytes(self.model)
        self._cap_context_to_positions()
        loaded = time.perf_counter()
        self._init_memory_pool(free_before)
        # Start-up phases as SGLang's sglang:startup_time_seconds{phase} names them.
        self.startup_seconds = {"load_weight": loaded - start,
                                "kv_cache_allocation": time.perf_counter() - loaded}
        self.attn_backend = create_attn_backend(
            server_args.attention_backend, self.device, self.req_to_token_pool, self.token_to_kv_pool
        )
        self.cuda_graph_runner = create_cuda_graph_runner(
            server_args, self.model, self.attn_backend, self.device, self.req_to_token_pool.size
        )
        self.compile_runner = create_compile_runner(
            server_args, self.model, self.attn_backend, self.device, self.req_to_token_pool.size
        )

    def _cap_context_to_positions(self) -> None:
        """An encoder's position table can be shorter than its config's context (RoBERTa numbers
        positions from padding_idx + 1); longer inputs must be refused, not crash the engine.
        Inputs of context_len tokens or more are refused, hence the + 1."""
        if self.model.max_positions is not None:
            mc = self.model_config
            mc.context_len = min(mc.context_len, self.model.max_positions + 1)

    def _init_memory_pool(self, free_before: int) -> None:
        mc, args = self.model_config, self.server_args
        per_token = TokenToKVPool.bytes_per_token(self.dtype, mc.num_kv_heads, mc.head_dim, mc.num_layers)
        if args.max_total_tokens:
            size = int(args.max_total_tokens)
        elif not self.model.uses_kv_cache:
            # Encoders keep no K/V: slots only meter how many tokens one batch may hold, so a
            # few prefill batches' worth is plenty (and costs no memory the model never uses).
            size = 4 * max(args.prefill_token_budget(self.device.type), mc.context_len)
        else:
            fraction = args.mem_fraction_static or (0.88 if self.device.type == "cuda" else 0.25)
            size = profile_max_num_tokens(free_before, self.weight_bytes, fraction, per_token)
        self.max_total_num_tokens = size
        rows = args.max_running_requests or max(16, min(1024, size // 32))
        # +1 row headroom is not needed: a row is held only while its request runs.
        self.req_to_token_pool = ReqToTokenPool(rows, mc.context_len + 1, self.device)
        self.token_to_kv_pool = TokenToKVPool(
            size, self.dtype, mc.num_kv_heads, mc.head_dim, mc.num_layers, self.device
        )
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size, self.device)
        logger.info(
            "KV pool: %d tokens (%.1f MiB), %d request rows of %d tokens",
            size, size * per_token / 2**20, rows, mc.context_len,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> LogitsOutput | EmbeddingPoolerOutput:
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        if self.compile_runner is not None and self.compile_runner.can_run(batch):
            return self.compile_runner.forward(batch)
        batch.plan_attention(self.attn_backend)
        return self.model(batch.input_ids, batch.positions, batch)

    def warmup(self) -> float:
        """One tiny extend + decode through the real pools, so first requests pay no lazy init."""
        start = time.perf_counter()
        rows = self.req_to_token_pool.alloc(1)
        slots = self.token_to_kv_pool_allocator.alloc(2)
        if rows is None or slots is None:
            return 0.0
        try:
            self.req_to_token_pool.req_to_token[rows[0], :2] = slots
            self.forward(ForwardBatch.create([[0]], [0], rows, slots[:1], self.device))
            if self.model.uses_kv_cache:  # encoders cannot extend a prefix
                self.forward(ForwardBatch.create([[0]], [1], rows, slots[1:], self.device))
        finally:
            self.token_to_kv_pool_allocator.free(slots)
            self.req_to_token_pool.free(rows)
        return time.perf_counter() - start
