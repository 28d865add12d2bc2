"""ModelRunner: owns the weights, the KV pools and the attention backend of one engine rank, and
runs one forward per ForwardBatch.

Set-up order matters: free memory is measured before the weights load, so the KV pool gets
`mem_fraction_static` of it minus what the weights took (or exactly `--max-total-tokens`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Optional

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput
from nlcli.engine.layers.attention import create_attn_backend
from nlcli.engine.model_executor.cuda_graph_runner import create_cuda_graph_runner
from nlcli.engine.model_loader.loader import load_model, weight_bytes
from nlcli.engine.mem_cache.pool import (
    ReqToTokenPool,
    TokenToKVPool,
    TokenToKVPoolAllocator,
    available_memory_bytes,
    profile_max_num_tokens,
)
from nlcli.engine.configs.model_config import ModelConfig
from nlcli.engine.configs.model_source import ModelSource, resolve_model_source

if TYPE_CHECKING:
    from nlcli.engine.layers.pooler import EmbeddingPoolerOutput

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, hf_config=None) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the log)."""
    if name != "auto":
        return _DTYPES[name], f"--dtype {name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bfloat16 on CUDA"
        return torch.float16, "auto: float16 (this GPU lacks bfloat16)"
    return pick_cpu_dtype(hf_config)


def pick_cpu_dtype(hf_config=None) -> tuple[torch.dtype, str]:
    """bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX) and a matmul of the
    model's own shape is measurably faster; otherwise float32 (exact, and on AVX2-only CPUs
    bfloat16 matmuls are several times slower). bfloat16 keeps SmolLM2's greedy output unchanged
    on the test prompts, so speed decides."""
    native = _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
    if not native:
        return torch.float32, "auto: float32 (CPU has no native bfloat16: no AVX512-BF16/AMX)"
    hidden = getattr(hf_config, "hidden_size", 1024) or 1024
    inter = getattr(hf_config, "intermediate_size", 4 * hidden) or 4 * hidden
    t32, t16 = (_time_linear(dtype, hidden, inter) for dtype in (torch.float32, torch.bfloat16))
    if t16 < 0.8 * t32:
        return torch.bfloat16, f"auto: bfloat16 matmul {t32 / t16:.1f}x faster than float32 here"
    return torch.float32, f"auto: float32 (bfloat16 matmul not faster here: {t32 / t16:.2f}x)"


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn else False
    except Exception:
        return False


def _time_linear(dtype: torch.dtype, hidden: int, inter: int, rows: int = 16, reps: int = 5) -> float:
    """Best-of-reps seconds for a decode-sized matmul of the model's MLP shape."""
    x = torch.randn(rows, hidden).to(dtype)
    w = torch.randn(inter, hidden).to(dtype)
    torch.nn.functional.linear(x, w)  # warm up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return len(cores) or (os.cpu_count() or 1)


def cpu_threads(requested: Optional[int]) -> tuple[Optional[int], str]:
    """torch's CPU thread count: --num-threads, else OMP_NUM_THREADS (torch already honours it),
    else one per physical core. SMT siblings are left out: OpenMP workers spin while waiting, and
    a worker sharing a core makes every step wait for a descheduled spinner. Leaving a core for
    the API process was measured too (benchmarks/README.md): on 2 cores it cost 35% of prefill
    speed for no decode gain, so only a machine shared with other heavy work should go lower."""
    if requested:
        return requested, "--num-threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cores = physical_cores()
    return cores, "one per physical core"


class ModelRunner:
    def __init__(self, server_args: ServerArgs, source: Optional[ModelSource] = None):
        self.server_args = server_args
        threads, why = cpu_threads(server_args.num_threads)
        if threads:
            torch.set_num_threads(threads)
            logger.info("torch CPU threads: %d (%s)", threads, why)
        if server_args.random_seed is not None:
            torch.manual_seed(server_args.random_seed)
        self.source = source or resolve_model_source(
            server_args.model_path, server_args.is_embedding, server_args.revision, server_args.download_dir
        )
        self.model_config = ModelConfig.from_source(
            self.source, server_args.context_length, server_args.is_embedding
        )
        self.device = resolve_device(server_args.device)
        self.dtype, why = resolve_dtype(server_args.dtype, self.device, self.model_config.hf_config)
        logger.info("Using dtype %s on %s (%s)", str(self.dtype).replace("torch.", ""), self.device, why)

        free_before = available_memory_bytes(self.device)
        self.model = load_model(self.model_config, self.source, self.dtype, self.device, server_args.load_format)
        self.weight_bytes = weight_bytes(self.model)
        max_positions = getattr(self.model, "max_positions", None)
        if max_positions is not None:
            # An encoder's position table can be shorter than its config's context (RoBERTa numbers
            # positions from padding_idx + 1); longer inputs must be refused, not crash the engine.
            # Inputs of context_len tokens or more are refused, hence the + 1.
            mc = self.model_config
            mc.context_len = min(mc.context_len, int(max_positions()) + 1)
        self._init_memory_pool(free_before)
        self.attn_backend = create_attn_backend(
            server_args.attention_backend, self.device, self.req_to_token_pool, self.token_to_kv_pool
        )
        self.cuda_graph_runner = create_cuda_graph_runner(
            server_args, self.model, self.attn_backend, self.device, self.req_to_token_pool.size
        )

    def _init_memory_pool(self, free_before: int) -> None:
        mc, args = self.model_config, self.server_args
        per_token = TokenToKVPool.bytes_per_token(self.dtype, mc.num_kv_heads, mc.head_dim, mc.num_layers)
        if args.max_total_tokens:
            size = int(args.max_total_tokens)
        elif not getattr(self.model, "uses_kv_cache", True):
            # Encoders keep no K/V: slots only meter how many tokens one batch may hold, so a
            # few prefill batches' worth is plenty (and costs no memory the model never uses).
            size = 4 * max(args.max_prefill_tokens, mc.context_len)
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
            if getattr(self.model, "uses_kv_cache", True):  # encoders cannot extend a prefix
                self.forward(ForwardBatch.create([[0]], [1], rows, slots[1:], self.device))
        finally:
            self.token_to_kv_pool_allocator.free(slots)
            self.req_to_token_pool.free(rows)
        return time.perf_counter() - start
