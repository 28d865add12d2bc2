"""The process of a TP rank > 0: join the group, load this rank's shard, follow rank 0.

It owns no sockets and no scheduler (step_sync.run_worker is its whole loop). It exits 0 when
rank 0 says shutdown, and non-zero when the group breaks (rank 0 or another rank died), when the
flags differ from rank 0's, or when its parent (`nl serve` on this node) is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

PARENT_POLL_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """A rank whose `nl serve` died (even by SIGKILL) must not linger in a collective."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="nl-parent-watch").start()


def run_tp_worker(server_args, tp_rank: int, dist_addr: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nl serve stops us (shutdown op or SIGTERM)
    from nlcli.engine.distributed.parallel_state import (check_same_args, destroy_tp_group,
                                                         init_tp_group)
    from nlcli.engine.distributed.step_sync import TPGroupError, run_worker
    from nlcli.engine.engine_process import configure_logging

    configure_logging(server_args.log_level, f" TP{tp_rank}")
    log = logging.getLogger("nlcli.engine")
    _exit_with_parent(os.getppid())
    try:
        init_tp_group(dist_addr, tp_rank, server_args.tp_size, server_args.device,
                      server_args.dist_timeout)
        check_same_args(server_args)
        from nlcli.engine.model_executor.model_runner import ModelRunner

        runner = ModelRunner(server_args)
    except Exception as e:
        log.error("TP rank %d failed to start: %s", tp_rank, e)
        sys.exit(1)
    try:
        run_worker(runner)
    except TPGroupError as e:
        log.error("TP rank %d: %s; exiting", tp_rank, e)
        sys.exit(1)
    destroy_tp_group()
