"""The tensor-parallel group of one engine: set it up and tear it down, this rank and the size.

One TP group is one torch.distributed world (gloo on CPU, nccl on CUDA) whose rendezvous is a
TCP store at `host:port`; each data-parallel group gets its own port, hence its own world. Python
objects (each step's batch, the flag fingerprint) travel on a gloo group even on CUDA, as SGLang
does, so they never go through GPU memory. Right after the group forms, every rank compares a
fingerprint of the flags that must agree and refuses, naming the flag, when a node differs.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Flags every rank must agree on; those of one node only (ports, API keys, node rank) differ.
FINGERPRINT_FIELDS = ("model_path", "revision", "is_embedding", "load_format", "dtype", "device",
                      "context_length", "json_model_override_args", "max_total_tokens",
                      "max_running_requests", "tp_size", "nnodes", "dist_init_addr")

_state: dict = {"cpu_group": None}


def tp_rank_size() -> tuple[int, int]:
    """(rank, size) of this engine's TP group; (0, 1) when none is set up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_tp_group(addr: str, rank: int, size: int, device: str, timeout_s: Optional[float]) -> None:
    """Join the group at tcp://addr as `rank` of `size`; a TimeoutError names `addr` when the
    rendezvous does not complete in time (an unreachable host, or a node that never came)."""
    backend = "nccl" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s or 1800)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank, world_size=size,
                                timeout=timeout)
    except Exception as e:
        raise TimeoutError(f"TP rank {rank} could not join the group at {addr} within "
                           f"{timeout.total_seconds():.0f} s (--dist-init-addr, --dist-timeout): "
                           f"{type(e).__name__}: {e}") from None
    _state["cpu_group"] = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    logger.info("TP rank %d of %d (pid %d) joined %s (%s)", rank, size, os.getpid(), addr, backend)


def destroy_tp_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _state["cpu_group"] = None


def cpu_group():
    """The gloo group Python objects are broadcast on."""
    return _state["cpu_group"]


def check_same_args(server_args) -> None:
    """Refuse (ValueError naming the first differing flag) when another rank started with other
    values of FINGERPRINT_FIELDS; every rank raises the same error."""
    mine = {name: getattr(server_args, name) for name in FINGERPRINT_FIELDS}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=cpu_group())
    for rank, theirs in enumerate(everyone):
        for name in FINGERPRINT_FIELDS:
            if theirs[name] != everyone[0][name]:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} differs between ranks: rank 0 has {everyone[0][name]!r}, "
                                 f"rank {rank} has {theirs[name]!r}; start every node with the same "
                                 "flags")


def all_reduce_min(value: int) -> int:
    """The smallest `value` over the group (the KV pool size every rank can hold)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
    return int(t.item())


def all_gather_objects(obj) -> list:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj, group=cpu_group())
    return everyone


def gather_vocab(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Whole-vocabulary logits from each rank's slice along the last dim (slices of `counts`
    columns, in rank order). gloo gathers only equal shapes, so slices are padded first."""
    width = max(counts)
    if local.shape[-1] < width:
        local = torch.nn.functional.pad(local, (0, width - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local.contiguous())
    return torch.cat([p[..., :n] for p, n in zip(parts, counts)], dim=-1)
