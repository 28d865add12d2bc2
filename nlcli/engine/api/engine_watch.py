"""EngineWatch: the TokenizerManager's lifecycle and health half: waiting for every engine
group to be ready, watching the engine processes (a dead one fails every pending request at once
with EngineDeadError), and health (/health is 503 when any group is silent or wedged).

A base class of TokenizerManager, which owns the attributes it reads: `groups` (dp/groups.py),
`inbox`, `_states`, `args`, `dead`, `draining`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable, Optional

from nlcli.engine.api.dp.groups import EngineGroups
from nlcli.engine.api.engine_link import EngineInbox
from nlcli.engine.api.prepare import import_grammar
from nlcli.engine.api.req_state import EngineDeadError, ReqState
from nlcli.engine.io_struct import EngineReady, Heartbeat

logger = logging.getLogger("nlcli.tokenizer_manager")


class EngineWatch:
    # Set by TokenizerManager.__init__.
    groups: EngineGroups
    inbox: EngineInbox
    ready: Optional[EngineReady]
    context_len: int
    pool_size: int
    dead: Optional[str]
    draining: bool
    _states: dict[str, ReqState]
    _tasks: list[asyncio.Task]

    def in_flight(self) -> list[ReqState]:  # TokenizerManager's
        raise NotImplementedError

    async def _recv_loop(self) -> None:  # TokenizerManager's
        raise NotImplementedError

    @property
    def gauges(self) -> Heartbeat:
        """The latest scheduler gauges (every group's, merged)."""
        return self.groups.gauges

    async def wait_ready(self, engine_alive: Callable[[], bool], timeout: float) -> EngineReady:
        """Wait for every group's EngineReady; RuntimeError if one dies or time runs out first."""
        readies = await self.groups.wait_ready(self.inbox, engine_alive, timeout)
        self.ready = readies[0]
        # Requests must fit whichever group they are routed to.
        self.context_len = min(r.context_len for r in readies)
        self.pool_size = min(r.max_total_num_tokens for r in readies)
        return self.ready

    def start(self, engine_alive: Callable[[], bool], on_dead: Callable[[], None]) -> None:
        # The first constrained request would otherwise stall the event loop importing xgrammar.
        if self.ready is None or self.ready.is_generation:
            threading.Thread(target=import_grammar, daemon=True, name="grammar-import").start()
        self._tasks.append(asyncio.create_task(self._recv_loop()))
        self._tasks.append(asyncio.create_task(self._watch(engine_alive, on_dead)))

    async def _watch(self, engine_alive, on_dead) -> None:
        while self.dead is None:
            if not engine_alive():
                self.mark_dead("The engine process exited unexpectedly.")
                on_dead()
                return
            await asyncio.sleep(0.2)

    def mark_dead(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        logger.error("%s Failing %d pending request(s).", reason, len(self._states))
        for st in self._states.values():
            st.fail(EngineDeadError(reason))

    def is_healthy(self) -> bool:
        # Beats come about once a second between steps: longer silence is one slow (hung?) step.
        stale = self.groups.stale(max(self.args.watchdog_timeout, 2.0))
        return self.dead is None and not self.draining and not stale and not self.wedged()

    def wedged(self) -> bool:
        """Requests sent long ago that the (heartbeating) engine group says it no longer has."""
        return self.groups.wedged(self.in_flight())

    def internal_states(self) -> list[dict]:
        """Per engine group: gauges and routing counters (/get_server_info)."""
        return self.groups.internal_states(self.in_flight())
