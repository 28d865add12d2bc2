"""ModelRunner: owns the weights, the KV pools and the attention backend of one engine rank, and
runs one forward per ForwardBatch.

Set-up reads top to bottom in `__init__`: threads and seed, the model's source and config, device
and dtype (model_executor/device.py), the weights, then the pools. Order matters: free memory is
measured before the weights load, so the KV pool gets `mem_fraction_static` of it minus what the
weights took (or exactly `--max-total-tokens`).

Under tensor parallelism (the group is already set up, distributed/parallel_state.py) the runner
holds this rank's shard; rank 0's `forward` and `update_weights` first announce the op to the
other ranks (distributed/step_sync.py), whose loop calls `run_forward` / `run_update_weights`.
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
from nlcli.engine.distributed.parallel_state import all_reduce_min, tp_rank_size
from nlcli.engine.distributed.split import attention_split
from nlcli.engine.distributed.step_sync import StepBroadcaster
from nlcli.engine.distributed.weight_sync import update_weights_all_ranks
from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput
from nlcli.engine.layers.attention import create_attn_backend
from nlcli.engine.layers.quantization import install_linear_methods, reinstall_linear_methods
from nlcli.engine.mem_cache.pool import (
    ReqToTokenPool,
    TokenToKVPool,
    TokenToKVPoolAllocator,
    available_memory_bytes,
    profile_max_num_tokens,
)
from nlcli.engine.model_executor.compile_runner import create_compile_runner
from nlcli.engine.model_executor.cpu_decode_limit import decode_step_timer, largest_winning_batch
from nlcli.engine.model_executor.cpu_decode_runner import create_cpu_decode_runner
from nlcli.engine.model_executor.cuda_graph_runner import create_cuda_graph_runner
from nlcli.engine.model_executor.device import apply_cpu_threads, choose_device_and_dtype
from nlcli.engine.model_loader.loader import load_model, weight_bytes
from nlcli.engine.model_loader.weight_update import WeightUpdateResult, update_weights_from_disk

if TYPE_CHECKING:
    from nlcli.engine.layers.pooler import EmbeddingPoolerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, server_args: ServerArgs, source: Optional[ModelSource] = None):
        self.server_args = server_args
        self.tp_rank, self.tp_size = tp_rank_size()
        # The ranks of this node share its cores (and, on a CPU, its memory); with --dp-size the
        # other groups' ranks share them too (their memory split is _place_dp_group's).
        self.ranks_on_node = max(1, self.tp_size // max(1, server_args.nnodes))
        apply_cpu_threads(server_args.num_threads, self.ranks_on_node * server_args.dp_size)
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
        self.quant_plan = install_linear_methods(self.model, server_args.quantization, self.dtype,
                                                 self.device, exact_dtype=server_args.dtype != "auto")
        logger.info("Quantization: %s", self.quant_plan.describe())
        self.weight_bytes += self.quant_plan.extra_bytes
        self._cap_context_to_positions()
        loaded = time.perf_counter()
        self._init_memory_pool(free_before)
        # Start-up phases as SGLang's sglang:startup_time_seconds{phase} names them.
        self.startup_seconds = {"load_weight": loaded - start,
                                "kv_cache_allocation": time.perf_counter() - loaded}
        self.attn_backend = create_attn_backend(
            server_args.attention_backend, self.device, self.req_to_token_pool, self.token_to_kv_pool
        )
        if self.tp_size > 1 and not server_args.disable_cuda_graph:
            logger.info("CUDA graphs off under tensor parallelism (collectives are not captured)")
            server_args = server_args.replace(disable_cuda_graph=True)
        self.cuda_graph_runner = create_cuda_graph_runner(
            server_args, self.model, self.attn_backend, self.device, self.req_to_token_pool.size
        )
        self.compile_runner = create_compile_runner(
            server_args, self.model, self.attn_backend, self.device, self.req_to_token_pool.size
        )
        self.cpu_decode_runner = (create_cpu_decode_runner(
            server_args, self.model, self.req_to_token_pool, self.token_to_kv_pool,
            self.quant_plan) if self.device.type == "cpu" and self.model.uses_kv_cache else None)
        if self.cpu_decode_runner is not None:
            limit = largest_winning_batch(decode_step_timer(self), self.quant_plan.max_rows)
            self.cpu_decode_runner.max_rows = limit.max_batch
            logger.info("Decode: nl's C decode step for decode batches of up to %d requests%s",
                        limit.max_batch, f" (measured per step, per-op -> C at batch {limit.text()})"
                        if limit.timings else "")
        self.tp_leader = (StepBroadcaster(self.req_to_token_pool)
                          if self.tp_size > 1 and self.tp_rank == 0 else None)

    def weights_changed(self) -> None:
        """Rebuild the quantized / prepacked copies from the live weights (after an update or a
        rollback), with the choices measured at start."""
        reinstall_linear_methods(self.model, self.quant_plan)
        if self.cpu_decode_runner is not None:
            self.cpu_decode_runner.refresh()
        if self.quant_plan.mode != "none":
            logger.info("Quantization after the weight change: %s", self.quant_plan.describe())

    def _cap_context_to_positions(self) -> None:
        """An encoder's position table can be shorter than its config's context (RoBERTa numbers
        positions from padding_idx + 1); longer inputs must be refused, not crash the engine.
        Inputs of context_len tokens or more are refused, hence the + 1."""
        if self.model.max_positions is not None:
            mc = self.model_config
            mc.context_len = min(mc.context_len, self.model.max_positions + 1)

    def _init_memory_pool(self, free_before: int) -> None:
        mc, args = self.model_config, self.server_args
        kv_heads = mc.num_kv_heads  # this rank's share of them under TP
        if self.tp_size > 1 and self.model.uses_kv_cache:
            kv_heads = attention_split(mc.num_attention_heads, mc.num_kv_heads, self.tp_rank,
                                       self.tp_size).kv_count
        per_token = TokenToKVPool.bytes_per_token(self.dtype, kv_heads, mc.head_dim, mc.num_layers)
        if args.max_total_tokens:
            size = int(args.max_total_tokens)
        elif not self.model.uses_kv_cache:
            # Encoders keep no K/V: slots only meter how many tokens one batch may hold, so a
            # few prefill batches' worth is plenty (and costs no memory the model never uses).
            size = 4 * max(args.prefill_token_budget(self.device.type), mc.context_len)
        else:
            fraction = args.mem_fraction_static or (0.88 if self.device.type == "cuda" else 0.25)
            if self.device.type == "cpu":
                fraction /= self.ranks_on_node
            size = profile_max_num_tokens(free_before, self.weight_bytes, fraction, per_token)
        if self.tp_size > 1:  # every rank must hold the same slots: the smallest pool wins
            size = all_reduce_min(size)
        self.max_total_num_tokens = size
        rows = args.max_running_requests or max(16, min(1024, size // 32))
        # +1 row headroom is not needed: a row is held only while its request runs.
        self.req_to_token_pool = ReqToTokenPool(rows, mc.context_len + 1, self.device)
        self.token_to_kv_pool = TokenToKVPool(
            size, self.dtype, kv_heads, mc.head_dim, mc.num_layers, self.device
        )
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size, self.device)
        logger.info(
            "KV pool: %d tokens (%.1f MiB), %d request rows of %d tokens",
            size, size * per_token / 2**20, rows, mc.context_len,
        )

    def forward(self, batch: ForwardBatch) -> LogitsOutput | EmbeddingPoolerOutput:
        if self.tp_leader is not None:
            self.tp_leader.forward(batch)
        return self.run_forward(batch)

    @torch.inference_mode()
    def run_forward(self, batch: ForwardBatch) -> LogitsOutput | EmbeddingPoolerOutput:
        """This rank's forward (ranks > 0 call it directly, on rank 0's word)."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        if self.compile_runner is not None and self.compile_runner.can_run(batch):
            return self.compile_runner.forward(batch)
        if self.cpu_decode_runner is not None and self.cpu_decode_runner.can_run(batch):
            return self.cpu_decode_runner.forward(batch)
        batch.plan_attention(self.attn_backend)
        return self.model(batch.input_ids, batch.positions, batch)

    def update_weights(self, model_path: str, load_format: Optional[str],
                       server_args: ServerArgs) -> WeightUpdateResult:
        """/update_weights_from_disk on every rank, all or nothing (model_loader/weight_update.py)."""
        if self.tp_leader is not None:
            self.tp_leader.update_weights(model_path, load_format, server_args)
        return self.run_update_weights(model_path, load_format, server_args)

    def run_update_weights(self, model_path: str, load_format: Optional[str],
                           server_args: ServerArgs) -> WeightUpdateResult:
        if self.tp_size > 1:
            return update_weights_all_ranks(self, model_path, load_format, server_args)
        return update_weights_from_disk(self, model_path, load_format, server_args)

    def ping(self) -> None:
        """While idle, rank 0 checks the other ranks are still there (TPGroupError if not)."""
        if self.tp_leader is not None:
            self.tp_leader.ping()

    def shutdown(self) -> None:
        if self.tp_leader is not None:
            self.tp_leader.shutdown()

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
