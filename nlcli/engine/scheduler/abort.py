"""Client aborts: /abort_request (one rid, or abort_all) and /pause_generation's abort mode.

A request still queued (waiting, or compiling its grammar) holds no KV, so it ends at once. A
running or chunked one is only marked (`to_abort`); the scheduler ends it before its next step,
when no forward is using its KV (`Scheduler._reap_aborted`).
"""

from __future__ import annotations

import logging
from collections import deque

from nlcli.engine.io_struct import AbortReq
from nlcli.engine.scheduler.grammar_queue import GrammarQueue
from nlcli.engine.scheduler.output import OutputProcessor
from nlcli.engine.scheduler.req import Req

logger = logging.getLogger("nlcli.scheduler")


def abort_requests(msg: AbortReq, outputs: OutputProcessor, waiting: deque[Req],
                   grammar_queue: GrammarQueue) -> None:
    found = None if msg.abort_all else outputs.find(msg.rid)
    for req in outputs.live() if msg.abort_all else [found] if found else []:
        queued = req in waiting
        if queued or grammar_queue.remove(req):
            if queued:
                logger.info("Abort queued request. req.rid=%s", req.rid)
                waiting.remove(req)
            req.finish_abort("Abort in waiting queue")
            outputs.finish([req])
        else:
            logger.info("Abort running request. req.rid=%s", req.rid)
            req.to_abort = msg.message
