"""The engine's half of a hot weight update: apply it between steps, once the engine is idle.

The scheduler keeps an `UpdateWeightReq` pending until nothing is running, half-prefilled or
queued (the API process holds new requests meanwhile, see `weight_update_manager`), then calls
`apply_weight_update`: `nlcli.engine.model_loader.weight_update` does the all-or-nothing load, and on success
the radix cache is flushed, since its K/V were computed by the old weights.
"""

from __future__ import annotations

import logging
from typing import Any

from nlcli.engine.io_struct import UpdateWeightReq, UpdateWeightReqOutput

logger = logging.getLogger("nlcli.scheduler")


def apply_weight_update(sched: Any, msg: UpdateWeightReq) -> UpdateWeightReqOutput:
    """Run in the scheduler's loop with no request running or queued."""
    from nlcli.engine.model_loader.weight_update import update_weights_from_disk

    runner = sched.runner
    logger.info("Update weights begin. model_path=%s", msg.model_path)
    try:
        result = update_weights_from_disk(runner, msg.model_path, msg.load_format, sched.args)
    except Exception as e:  # a runner that cannot update at all (e.g. a test fake)
        logger.exception("Weight update failed")
        result = (False, f"Failed to update weights: {e}.")
    success, message = result
    if success:
        sched.args = sched.args.replace(model_path=runner.server_args.model_path,
                                        load_format=runner.server_args.load_format)
        if not sched.flush_cache():
            logger.error("Cache not flushed after a weight update; stale prefixes may be served")
        logger.info("Update weights end.")
    return UpdateWeightReqOutput(success, message, sched.args.model_path, sched.args.load_format)
