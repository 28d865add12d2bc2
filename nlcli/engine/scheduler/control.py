"""StepControl: what the API process asked of the engine's loop between steps, a pending weight
update (/update_weights) and the generation pause (/pause_generation, /continue_generation; the
API's half is api/pause.py).

While paused no batch runs and new requests queue. The scheduler does the pause mode's work on its
own requests before `apply` answers: `abort` ends every request, `retract` moves running ones back
to the queue (their KV freed, recomputed after continue), `in_place` keeps them and their KV.
Queued requests own no KV slots or radix-cache locks, so while paused a pending weight update and
a cache flush may run once no request holds KV; otherwise they wait until nothing runs or waits.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from nlcli.engine.io_struct import GenerationControlOutput, GenerationControlReq, UpdateWeightReq

logger = logging.getLogger("nlcli.scheduler")


class StepControl:
    def __init__(self, send: Callable[[object], None]):
        self.send = send
        self.paused = False
        self.pending_update: Optional[UpdateWeightReq] = None

    def queue_update(self, msg: UpdateWeightReq) -> None:
        self.pending_update = msg  # taken by the scheduler's step once `take_update` allows

    def take_update(self, has_work: bool, holds_kv: bool) -> Optional[UpdateWeightReq]:
        """The pending weight update if it may run now: once nothing runs or waits, or, while
        paused, once no request holds KV (after an `abort` or `retract` pause)."""
        if self.pending_update is None or (holds_kv if self.paused else has_work):
            return None
        update, self.pending_update = self.pending_update, None
        return update

    def flush_allowed(self, has_work: bool, holds_kv: bool) -> bool:
        """Whether the radix cache may be flushed now: with no pending request, or, while paused,
        with none holding KV."""
        return not holds_kv and (self.paused or not has_work)

    def apply(self, msg: GenerationControlReq, num_requests: int) -> None:
        """Pause or continue, then answer the API process; `num_requests`: the requests the
        engine still holds (running or queued)."""
        self.paused = msg.pause
        if not msg.pause and msg.torch_empty_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("Generation %s (mode=%s)", "paused" if msg.pause else "continued", msg.mode)
        self.send(GenerationControlOutput(self.paused, num_requests))
