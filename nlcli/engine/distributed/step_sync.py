"""Rank 0 tells the other TP ranks what to do, one op at a time; ranks > 0 only follow.

Rank 0 owns the sockets and the Scheduler. Before each model op it broadcasts the op on the
gloo group: ("forward", batch, req_to_token rows), ("update_weights", path, format, args),
("ping",) once a heartbeat (a dead rank is noticed within a second, and the other ranks' waits
stay under --dist-timeout) or ("shutdown",). The batch goes with the req_to_token rows it reads,
since only rank 0's scheduler writes them: whole rows up to the longest seq_len, because a
one-token "decode" batch may be a new request whose prefix the radix cache just wrote into its
row. Tensors travel on the CPU and are moved to each rank's device on arrival.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from nlcli.engine.distributed.parallel_state import cpu_group
from nlcli.engine.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


class TPGroupError(RuntimeError):
    """A collective with the other ranks failed: a rank died or the group is broken. Fatal."""


def _broadcast(op: tuple | None) -> tuple:
    box = [op]
    try:
        dist.broadcast_object_list(box, src=0, group=cpu_group())
    except Exception as e:
        raise TPGroupError(f"tensor-parallel group broken ({type(e).__name__}: {e})") from None
    return box[0]


def _moved(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    changes = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, attn_backend=None, attn_plan=None, **changes)


class StepBroadcaster:
    """Rank 0's side: announce each op before running it locally."""

    def __init__(self, req_to_token_pool):
        self.req_to_token_pool = req_to_token_pool

    def forward(self, batch: ForwardBatch) -> None:
        longest = max(batch.seq_lens_cpu, default=0)
        rows = self.req_to_token_pool.req_to_token[batch.req_pool_indices, :longest]
        _broadcast(("forward", _moved(batch, torch.device("cpu")), rows.cpu()))

    def update_weights(self, model_path: str, load_format, server_args) -> None:
        _broadcast(("update_weights", model_path, load_format, server_args))

    def ping(self) -> None:
        _broadcast(("ping",))

    def shutdown(self) -> None:
        try:
            _broadcast(("shutdown",))
        except TPGroupError as e:  # already gone: nothing to tell
            logger.info("TP shutdown not delivered: %s", e)


def run_worker(runner) -> None:
    """The loop of a rank > 0: follow rank 0's ops until it says shutdown. A broken group (rank 0
    gone) raises TPGroupError, which ends the process non-zero."""
    while True:
        op = _broadcast(None)
        kind = op[0]
        if kind == "forward":
            _, batch, rows = op
            pool = runner.req_to_token_pool.req_to_token
            pool[batch.req_pool_indices.to(pool.device), : rows.shape[1]] = rows.to(pool.device)
            runner.run_forward(_moved(batch, runner.device))
        elif kind == "update_weights":
            runner.run_update_weights(*op[1:])
        elif kind == "shutdown":
            logger.info("TP worker shutting down")
            return
