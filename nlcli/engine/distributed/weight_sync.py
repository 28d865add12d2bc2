"""Hot weight updates under tensor parallelism: every rank loads its shard, all or nothing.

Each rank runs the single-rank update (model_loader/weight_update.py: validate, then copy, with
its own rollback on a failed copy); the ranks then exchange their results. If any rank failed,
the ranks that succeeded read their original checkpoint back in, so no rank serves new weights
beside another's old ones. Rank 0's answer names the rank that failed.
"""

from __future__ import annotations

import logging
from typing import Optional

from nlcli.engine.distributed.parallel_state import all_gather_objects
from nlcli.engine.model_loader.weight_update import (ROLLBACK_SUFFIX, WeightUpdateResult,
                                                     restore_original_weights,
                                                     update_weights_from_disk)

logger = logging.getLogger(__name__)


def update_weights_all_ranks(runner, model_path: str, load_format: Optional[str],
                             server_args) -> WeightUpdateResult:
    before = (runner.source, runner.server_args)
    try:
        mine = update_weights_from_disk(runner, model_path, load_format, server_args)
    except Exception as e:  # every rank must reach the exchange below, whatever happened
        logger.exception("Weight update failed on TP rank %d", runner.tp_rank)
        mine = WeightUpdateResult(False, f"Failed to update weights: {e}.{ROLLBACK_SUFFIX}")
    results = all_gather_objects(tuple(mine))
    failed = [(rank, msg) for rank, (ok, msg) in enumerate(results) if not ok]
    if not failed:
        return mine
    if mine.success:  # another rank failed: back to the weights every rank still agrees on
        runner.source, runner.server_args = before
        restored = restore_original_weights(runner)
        logger.warning("TP rank %d rolled back a weight update another rank failed%s",
                       runner.tp_rank, "" if restored is None else f": {restored}")
    if not mine.success:
        return mine
    rank, message = failed[0]
    return WeightUpdateResult(False, f"TP rank {rank}: {message}")
