"""CudaGraphRunner: decode forwards replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is mostly kernel launches; replaying a captured graph issues them
all at once. Buckets are 1, 2, 4, 8, then steps of 8 up to `--cuda-graph-max-bs` (SGLang's), and
a batch is padded up to its bucket. The graphs read static buffers (input ids, positions,
`out_cache_loc`, `req_pool_indices` — the kernels read `req_to_token` rows through it —, sequence
lengths), so a replay copies the batch into them first. Padding rows are all zeros: token 0 at
position 0, written to the pool's dummy slot 0, with sequence length 0, which the decode kernel
answers with a zero row without reading any K/V; their logits are dropped. The captured region
ends at the logits: the sampler runs outside, eagerly.

Only used on CUDA with the Triton attention backend, whose decode plan does not depend on the
sequence lengths (`plan(batch, for_graph=True)`); never on the CPU. `capture` is injectable so the
bucketing and padding run in CPU tests with a stand-in graph.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Optional, Protocol

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.forward_batch import ForwardBatch, ForwardMode, LogitsOutput
from nlcli.engine.layers.triton_attention import TritonAttentionBackend

logger = logging.getLogger(__name__)


class Graph(Protocol):
    def replay(self) -> None: ...


# capture(fn) -> (graph, fn's outputs): replaying the graph rewrites those output tensors.
Capture = Callable[[Callable[[], LogitsOutput]], tuple[Graph, LogitsOutput]]


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_bs."""
    return [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))


def bucket_for(bs: int, sizes: list[int]) -> Optional[int]:
    """The smallest captured size that holds bs requests; None when bs is larger than all."""
    i = bisect.bisect_left(sizes, bs)
    return sizes[i] if i < len(sizes) else None


def cuda_capture(pool) -> Capture:
    """Capture on CUDA: warm up on a side stream (lazy init, Triton compiles), then record."""

    def capture(fn: Callable[[], LogitsOutput]) -> tuple[Graph, LogitsOutput]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    return capture


class CudaGraphRunner:
    def __init__(self, model, attn_backend, max_bs: int, device: torch.device, capture: Capture):
        self.model = model
        self.attn_backend = attn_backend
        self.sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        # One row per input, so padding is a single fill: [input_ids, positions, out_cache_loc,
        # req_pool_indices, seq_lens, prefix_lens] x max_bs, int64.
        self.inputs = torch.zeros((6, self.max_bs), dtype=torch.int64, device=device)
        self.ones = torch.ones(self.max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, LogitsOutput] = {}
        self._capture = capture

    def capture_all(self) -> float:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                batch = self._static_batch(bs)
                batch.attn_backend = self.attn_backend
                batch.attn_plan = self.attn_backend.plan(batch, for_graph=True)
                run = lambda b=batch: self.model(b.input_ids, b.positions, b)  # noqa: E731
                self.graphs[bs], self.outputs[bs] = self._capture(run)
        return time.perf_counter() - start

    def _static_batch(self, bs: int) -> ForwardBatch:
        ids, pos, loc, rows, seq_lens, prefix_lens = self.inputs[:, :bs]
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=ids, positions=pos,
            out_cache_loc=loc, req_pool_indices=rows, seq_lens=seq_lens, prefix_lens=prefix_lens,
            extend_lens=self.ones[:bs],
            # Host lists of a capture stand for no batch in particular; the graph plan reads none.
            seq_lens_cpu=[1] * bs, prefix_lens_cpu=[0] * bs, extend_lens_cpu=[1] * bs,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.forward_mode == ForwardMode.DECODE and batch.batch_size <= self.max_bs
                and not batch.return_all_logits)

    def replay(self, batch: ForwardBatch) -> LogitsOutput:
        """Next-token logits of `batch`, valid until the next replay (the sampler reads them first)."""
        bs = batch.batch_size
        padded = bucket_for(bs, self.sizes)
        sources = (batch.input_ids, batch.positions, batch.out_cache_loc, batch.req_pool_indices,
                   batch.seq_lens, batch.prefix_lens)
        for row, src in zip(self.inputs, sources):
            row[:bs].copy_(src)
        if padded > bs:
            self.inputs[:, bs:padded].zero_()
        self.graphs[padded].replay()
        return LogitsOutput(next_token_logits=self.outputs[padded].next_token_logits[:bs])


def create_cuda_graph_runner(server_args: ServerArgs, model, attn_backend, device: torch.device,
                             max_running_requests: int) -> Optional[CudaGraphRunner]:
    """Capture decode graphs where they apply: CUDA, the Triton backend, a generation model, and
    not `--disable-cuda-graph`. None otherwise (the forward stays eager)."""
    if (server_args.disable_cuda_graph or device.type != "cuda" or server_args.is_embedding
            or not isinstance(attn_backend, TritonAttentionBackend)):
        return None
    max_bs = min(server_args.cuda_graph_max_bs, max_running_requests)
    if max_bs < 1:
        return None
    runner = CudaGraphRunner(model, attn_backend, max_bs, device,
                             cuda_capture(torch.cuda.graph_pool_handle()))
    seconds = runner.capture_all()
    logger.info("CUDA graphs: captured decode batch sizes %s in %.1f s", runner.sizes, seconds)
    return runner
