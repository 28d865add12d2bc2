"""The engine's half of a hot weight update: apply it between steps, once the engine is idle.

The scheduler keeps an `UpdateWeightReq` pending until nothing is running, half-prefilled or
queued (the API process holds new requests meanwhile, see `api/update_weights.py`), then calls
`apply_weight_update`: the runner's `update_weights` does the all-or-nothing load (on every TP
rank; `nlcli.engine.model_loader.weight_update` per rank), and on success the radix cache is
flushed, since its K/V were computed by the old weights.
"""

from __future__ import annotations

import logging
from typing import Callable

from nlcli.engine.args import ServerArgs
from nlcli.engine.io_struct import UpdateWeightReq, UpdateWeightReqOutput

logger = logging.getLogger("nlcli.scheduler")


def apply_weight_update(
    runner, args: ServerArgs, msg: UpdateWeightReq, flush_cache: Callable[[], bool]
) -> tuple[UpdateWeightReqOutput, ServerArgs]:
    """Run in the scheduler's loop with no request running or queued. Returns the answer for the
    API process and the server args to serve with from now on (new model path on success)."""
    logger.info("Update weights begin. model_path=%s", msg.model_path)
    try:
        success, message = runner.update_weights(msg.model_path, msg.load_format, args)
    except Exception as e:  # a runner that cannot update at all (e.g. a test fake)
        logger.exception("Weight update failed")
        success, message = False, f"Failed to update weights: {e}."
    if success:
        args = args.replace(model_path=runner.server_args.model_path,
                            load_format=runner.server_args.load_format)
        if not flush_cache():
            logger.error("Cache not flushed after a weight update; stale prefixes may be served")
        logger.info("Update weights end.")
    return UpdateWeightReqOutput(success, message, args.model_path, args.load_format), args
