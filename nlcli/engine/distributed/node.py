"""The engine ranks `nl serve` runs on this node, seen from its (torch-free) launcher: whether
the topology flags make sense, where a group meets, whether every rank lives, how they are
stopped, and the whole life of a node other than node 0 (ranks only, no HTTP server).
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import Optional

logger = logging.getLogger("nlcli.launch")


def topology_error(args) -> Optional[str]:
    """What is wrong with --tp-size / --nnodes / --node-rank / --dist-init-addr, if anything."""
    if args.tp_size < 1 or args.nnodes < 1:
        return "--tp-size and --nnodes must be at least 1"
    if args.tp_size % args.nnodes:
        return f"--tp-size {args.tp_size} does not split over --nnodes {args.nnodes}"
    if not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}"
    if args.nnodes > 1 and not args.dist_init_addr:
        return "--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)"
    if args.nnodes > 1 and args.dp_size > 1:
        return "--dp-size > 1 runs on one node; with --nnodes > 1 use --dp-size 1"
    if args.dist_init_addr and not args.dist_init_addr.rpartition(":")[2].isdigit():
        return f"--dist-init-addr {args.dist_init_addr} is not HOST:PORT"
    return None


def dist_addr(args, dp_rank: int = 0) -> str:
    """Where one engine group's ranks meet: --dist-init-addr's port + dp_rank (each data-parallel
    group is its own torch.distributed world), else a free loopback port."""
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        return f"{host}:{int(port) + dp_rank}"
    return f"127.0.0.1:{free_port()}"


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_alive(procs: list) -> bool:
    """Every engine process is alive; else the first dead one is logged with its exit code."""
    for proc in procs:
        if not proc.is_alive():
            if proc.exitcode is not None:
                logger.error("%s exited with code %s", proc.name, proc.exitcode)
            return False
    return True


def follow_node(args, procs: list) -> int:
    """--node-rank > 0: wait on this node's ranks until they exit (node 0 gone) or a signal."""
    logger.info("Node %d of %d: running TP ranks %d..%d (no HTTP server; node 0 at %s)",
                args.node_rank, args.nnodes, args.node_rank * args.tp_size // args.nnodes,
                (args.node_rank + 1) * args.tp_size // args.nnodes - 1, args.dist_init_addr)
    try:
        while all_alive(procs):
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_ranks(procs, timeout=0)
        return 130
    failed = [p for p in procs if p.exitcode not in (0, None)]
    stop_ranks(procs, timeout=5)
    return 1 if failed else 0


def stop_ranks(procs: list, timeout: float = 10.0) -> None:
    """Rank 0 first (it tells the other ranks to stop), then every rank is reaped."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if proc.exitcode not in (0, None):
            logger.info("Engine process %s exited with code %s", proc.name, proc.exitcode)
    sys.stderr.flush()
