"""CompileRunner: CPU decode forwards through torch.compile (inductor), one compiled graph set per
batch-size bucket (`--enable-torch-compile`, buckets up to `--torch-compile-max-bs`, SGLang's
flags).

A decode step of a small model on the CPU is mostly small ops (norms, rotary, activation, residual
adds), each a dispatch, an allocation and an OpenMP fork-join; inductor fuses them into a few C++
loops. Attention stays eager (`torch.compiler.disable` on the backend's forward): its gather sizes
change every step, and a graph break there costs one Python call per layer. The compiled region is
the decoder body (`model.model`); the lm_head and the sampler run eagerly, as in the CUDA graph
runner.

Compiling a bucket takes tens of seconds, so it never happens on the request path: a background
thread compiles the buckets, smallest first, on a dummy batch (token 0 at position 0, written to the
pool's dummy slot 0), while eager forwards serve. A decode batch then runs compiled once its
bucket is ready, padded up to the bucket with such dummy rows (the CUDA graph runner's buckets and
padding), whose outputs are dropped. Shapes are static per bucket (`dynamic=False`), so a graph
never recompiles for a new batch size.

Off by default: on a 2-core AVX2 EPYC (float32 SmolLM2-135M, 1 thread) the 30 graph breaks and
guard checks cost more than the fused small ops save (paired steps: batch 1 60 vs 55 ms eager,
batch 32 398 vs 378 ms); inductor's freezing was slower still. Fusing attention into the graph is
what would make it pay.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.forward_batch import ForwardBatch, ForwardMode, LogitsOutput
from nlcli.engine.model_executor.cuda_graph_runner import bucket_for, capture_batch_sizes
from nlcli.engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


class CompileRunner:
    def __init__(self, model, attn_backend, max_bs: int, device: torch.device):
        self.model = model
        self.attn_backend = attn_backend
        self.device = device
        self.sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        # Attention runs eagerly between the compiled regions (this backend object only).
        attn_backend.forward = torch.compiler.disable(attn_backend.forward)
        self.body = torch.compile(model.model, dynamic=False)
        self.ready: set[int] = set()
        self.compile_seconds: dict[int, float] = {}
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Compile every bucket in a background thread (smallest first); eager serves meanwhile."""
        self.thread = threading.Thread(target=self.compile_all, name="torch-compile", daemon=True)
        self.thread.start()

    def compile_all(self) -> None:
        import torch._dynamo

        # Each frame (the decoder layer, resumed after its attention's graph break) caches a few
        # graphs per bucket (the first layer has no residual yet). Set in this thread: dynamo's
        # config is per thread.
        limit = 4 * len(self.sizes) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        try:
            for bs in self.sizes:
                start = time.perf_counter()
                self._run(None, bs)
                self.compile_seconds[bs] = time.perf_counter() - start
                self.ready.add(bs)
                logger.info("torch.compile: decode batch size %d ready in %.1f s", bs,
                            self.compile_seconds[bs])
        except Exception:  # noqa: BLE001 - eager keeps serving; the log says why
            logger.exception("torch.compile failed; decode stays eager")

    def can_run(self, batch: ForwardBatch) -> bool:
        if batch.forward_mode != ForwardMode.DECODE or batch.return_all_logits:
            return False
        padded = bucket_for(batch.batch_size, self.sizes)
        return padded is not None and padded in self.ready

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        return self._run(batch, bucket_for(batch.batch_size, self.sizes))

    def _run(self, batch: Optional[ForwardBatch], bs: int) -> LogitsOutput:
        # The graphs' guards include the inputs' dispatch keys: compile and serve both on
        # inference tensors, built here (never the caller's tensors), or every step recompiles.
        with torch.inference_mode():
            padded = self._pad(batch, bs)
            padded.plan_attention(self.attn_backend)
            hidden = self.body(padded.input_ids, padded.positions, padded)
            if batch is None:
                return LogitsOutput(next_token_logits=hidden)
            return self.model.logits(hidden[: batch.batch_size], batch)

    def _pad(self, batch: Optional[ForwardBatch], bs: int) -> ForwardBatch:
        """`batch` plus dummy rows up to `bs` (all dummy rows when batch is None): token 0 at
        position 0 of request row 0, written to the dummy slot 0, attending over one slot."""
        n = 0 if batch is None else batch.batch_size
        pad = bs - n
        zeros = torch.zeros(pad, dtype=torch.int64, device=self.device)
        ones = torch.ones(pad, dtype=torch.int64, device=self.device)

        def cat(t: Optional[torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
            return fill if t is None else torch.cat((t, fill))  # a copy even when pad is 0

        get = (lambda name: None) if batch is None else (lambda name: getattr(batch, name))
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs,
            input_ids=cat(get("input_ids"), zeros), positions=cat(get("positions"), zeros),
            out_cache_loc=cat(get("out_cache_loc"), zeros),
            req_pool_indices=cat(get("req_pool_indices"), zeros),
            seq_lens=cat(get("seq_lens"), ones), prefix_lens=cat(get("prefix_lens"), zeros),
            extend_lens=cat(get("extend_lens"), ones),
            seq_lens_cpu=(get("seq_lens_cpu") or []) + [1] * pad,
            prefix_lens_cpu=(get("prefix_lens_cpu") or []) + [0] * pad,
            extend_lens_cpu=(get("extend_lens_cpu") or []) + [1] * pad,
        )


def create_compile_runner(server_args: ServerArgs, model, attn_backend, device: torch.device,
                          max_running_requests: int) -> Optional[CompileRunner]:
    """A CompileRunner compiling in the background where `--enable-torch-compile` applies: the
    CPU and a Llama-family generator (a `model` body, then `logits`; embedding and score heads
    override `forward` and stay eager). None otherwise."""
    if not server_args.enable_torch_compile:
        return None
    if (device.type != "cpu" or server_args.is_embedding
            or type(model).forward is not LlamaForCausalLM.forward):
        logger.warning("--enable-torch-compile applies to CPU decoders only; ignored here")
        return None
    if server_args.tp_size > 1:  # each rank would compile its own graph around the collectives
        logger.warning("--enable-torch-compile is off under --tp-size > 1; ignored")
        return None
    max_bs = min(server_args.torch_compile_max_bs, max_running_requests)
    if max_bs < 1:
        return None
    runner = CompileRunner(model, attn_backend, max_bs, device)
    logger.info("torch.compile: compiling decode batch sizes %s in the background", runner.sizes)
    runner.start()
    return runner
