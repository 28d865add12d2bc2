"""Whether generation is healthy: `is_wedged` (work the API process sent that the engine no
longer does) and the /health_generate probe.

The engine reports its queue and running counts in a heartbeat about once a second. A request the
API process sent long ago, with no output for as long, while the engine's recent heartbeats say it
has nothing running or queued, will never finish (a lost message, an engine that dropped it): the
server must not answer /health 200 then, and a weight update's drain must not wait for it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Iterable, Optional

from nlcli.engine.api.native_input import GenItem
from nlcli.engine.api.req_state import EngineDeadError
from nlcli.engine.io_struct import Heartbeat

HEALTH_CHECK_TIMEOUT = 20.0
# Seconds a sent request may go without any engine output while the engine says it is idle.
WEDGE_AFTER = 30.0
# A heartbeat counts only when the engine produced it this long after the oldest request was sent
# (so it cannot predate that request's arrival).
HEARTBEAT_MARGIN = 5.0


def is_wedged(sent_times: Iterable[float], gauges: Heartbeat, gauges_at: float, last_output: float,
              now: float, after: Optional[float] = None) -> bool:
    """True when the oldest pending request (by `sent_times`, monotonic) was sent more than
    `after` seconds ago, no engine output came for as long, and the engine's latest heartbeat
    (received at `gauges_at`, after that request) shows nothing running, queued or compiling a
    grammar."""
    after = WEDGE_AFTER if after is None else after
    oldest = min(sent_times, default=None)
    if oldest is None or now - oldest <= after or now - last_output <= after:
        return False
    idle = (gauges.num_running_reqs == 0 and gauges.num_queue_reqs == 0
            and gauges.num_grammar_queue_reqs == 0)  # a grammar still compiling is work too
    return idle and gauges_at > oldest + HEARTBEAT_MARGIN


async def probe_generate(tm) -> bool:
    """/health_generate: healthy, and a one-token generation finishes in time in every engine
    group (--dp-size)."""
    if not tm.is_healthy():
        return False
    tag = uuid.uuid4().hex
    rids = [f"HEALTH_CHECK_{tag}_{g}" for g in range(len(tm.groups))]
    try:
        states = []
        for g, rid in enumerate(rids):
            item = GenItem(None, [0], {"max_new_tokens": 1, "temperature": 0.7}, rid)
            states += await tm.submit([item], stream=True, group=g)
        await asyncio.wait_for(asyncio.gather(*(tm.next_output(st) for st in states)),
                               timeout=HEALTH_CHECK_TIMEOUT)
        return True
    except (asyncio.TimeoutError, EngineDeadError, ValueError):
        return False
    finally:
        tm.abort(rids, "health check done")
