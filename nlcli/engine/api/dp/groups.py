"""EngineGroups: what the API process knows about each engine group (one unless --dp-size):
when it last spoke, its latest heartbeat gauges, the requests routed to it and the prompt and
cached tokens of those that finished. Health is per group: the server is unhealthy when any
group is silent or wedged.

Requests in flight per group are counted from the TokenizerManager's table of unfinished requests
(each ReqState carries its `group`), never kept as separate counters, so an aborted or failed
request can never leave a group looking busy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from nlcli.engine.api.dp.fan_in import merge_heartbeats
from nlcli.engine.api.engine_health import is_wedged
from nlcli.engine.io_struct import EngineReady, Heartbeat


@dataclass
class GroupState:
    last_heartbeat: float
    last_output: float
    gauges: Heartbeat = field(default_factory=Heartbeat)
    gauges_at: float = 0.0
    ready: EngineReady | None = None
    routed: int = 0  # requests sent (or held for) this group
    finished: int = 0
    prompt_tokens: int = 0  # of finished generation requests
    cached_tokens: int = 0


class EngineGroups:
    def __init__(self, n: int):
        now = time.monotonic()
        self.states = [GroupState(now, now) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.states)

    def heard(self, group: int, msg: object) -> None:
        """Any message from `group` proves it alive; a heartbeat brings its gauges."""
        g, now = self.states[group], time.monotonic()
        g.last_heartbeat = now
        if isinstance(msg, Heartbeat):
            g.gauges, g.gauges_at = msg, now
        else:
            g.last_output = now
        if isinstance(msg, EngineReady):
            g.ready = msg

    async def wait_ready(self, inbox, engine_alive: Callable[[], bool],
                         timeout: float) -> list[EngineReady]:
        """Every group's EngineReady, read from `inbox` (an EngineInbox); RuntimeError if an
        engine process dies or `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await inbox.poll(200):
                group, msg = await inbox.recv()
                if isinstance(msg, EngineReady):
                    self.heard(group, msg)
                if all(g.ready is not None for g in self.states):
                    return [g.ready for g in self.states]
            elif not engine_alive():
                raise RuntimeError("The engine process exited during start-up (see the log above).")
        raise RuntimeError(f"The engine did not become ready within {timeout:.0f} s.")

    @property
    def gauges(self) -> Heartbeat:
        """Every group's latest gauges merged (one group: its own)."""
        if len(self.states) == 1:
            return self.states[0].gauges
        return merge_heartbeats([g.gauges for g in self.states])

    def routed(self, group: int) -> None:
        self.states[group].routed += 1

    def finished(self, group: int, meta: dict) -> None:
        g = self.states[group]
        g.finished += 1
        g.prompt_tokens += int(meta.get("prompt_tokens") or 0)
        g.cached_tokens += int(meta.get("cached_tokens") or 0)

    def loads(self, unfinished: Iterable) -> list[int]:
        """Requests in flight per group, from the unfinished ReqStates."""
        loads = [0] * len(self.states)
        for st in unfinished:
            loads[st.group] += 1
        return loads

    def stale(self, timeout: float) -> bool:
        """Some group has been silent (no heartbeat, no output) for over `timeout` seconds."""
        now = time.monotonic()
        return any(now - g.last_heartbeat > timeout for g in self.states)

    def wedged(self, unfinished: list) -> bool:
        """Some group has requests it was sent long ago that it says it no longer has."""
        now = time.monotonic()
        for i, g in enumerate(self.states):
            sent = (st.sent_at for st in unfinished if st.group == i and st.sent_at is not None)
            if is_wedged(sent, g.gauges, g.gauges_at, g.last_output, now):
                return True
        return False

    def internal_states(self, unfinished: list) -> list[dict]:
        """Per group, for /get_server_info (SGLang reports one `internal_states` entry per DP
        rank): its gauges and nl's own counters of what it was routed and finished."""
        loads = self.loads(unfinished)
        return [{"dp_rank": i, **dataclasses.asdict(g.gauges), "num_routed_reqs": g.routed,
                 "num_in_flight_reqs": loads[i], "num_finished_reqs": g.finished,
                 "prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens}
                for i, g in enumerate(self.states)]
