"""The API process's ZMQ link to the engine groups (one group unless --dp-size): pickled messages
out (EngineLink), engine messages in, tagged with their group (EngineInbox), and the hold a weight
update puts on new generation requests (they wait here, already pickled, until it is released)."""

from __future__ import annotations

import pickle
from typing import Optional

import zmq
import zmq.asyncio


def dumps(msg: object) -> bytes:
    return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)


class EngineLink:
    """Control messages go to every group; a generation request to the group `assign` chose."""

    def __init__(self, ctx: zmq.asyncio.Context, addrs: list[str]):
        self.socks = []
        for addr in addrs:
            sock = ctx.socket(zmq.PUSH)
            sock.connect(addr)
            self.socks.append(sock)
        self._held: Optional[list[tuple[str, bytes, int]]] = None
        self._group: dict[str, int] = {}  # rid -> group, from assign until send_or_hold

    def send(self, frame: bytes) -> None:
        """To every group (aborts, flushes, weight updates, pauses, shutdown)."""
        for sock in self.socks:
            sock.send(frame)

    def send_to(self, group: int, frame: bytes) -> None:
        self.socks[group].send(frame)

    def assign(self, rid: str, group: int) -> None:
        """The group that request `rid`'s next send_or_hold goes to."""
        self._group[rid] = group

    def send_or_hold(self, rid: str, frame: bytes) -> bool:
        """Send a generation request's `frame` to its group now (True), or keep it while held
        (False)."""
        group = self._group.pop(rid, 0)
        if self._held is not None:
            self._held.append((rid, frame, group))
            return False
        self.socks[group].send(frame)
        return True

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def take_held(self) -> list[tuple[str, bytes, int]]:
        """End the hold: the (rid, frame, group) kept meanwhile, in arrival order."""
        held, self._held = self._held or [], None
        return held


class EngineInbox:
    """Messages from every group, each with the index of the group that sent it."""

    def __init__(self, ctx: zmq.asyncio.Context, addrs: list[str]):
        self.socks = []
        self.poller = zmq.asyncio.Poller()
        for addr in addrs:
            sock = ctx.socket(zmq.PULL)
            sock.connect(addr)
            self.poller.register(sock, zmq.POLLIN)
            self.socks.append(sock)
        self._group = {sock: g for g, sock in enumerate(self.socks)}
        self._ready: list[zmq.asyncio.Socket] = []

    async def poll(self, timeout_ms: Optional[int]) -> bool:
        """Whether a message is waiting (after up to `timeout_ms`)."""
        if not self._ready:
            self._ready = [s for s, _ in await self.poller.poll(timeout_ms)]
        return bool(self._ready)

    async def recv(self) -> tuple[int, object]:
        """(group, message); groups that have messages take turns."""
        if len(self.socks) == 1 and not self._ready:  # one group: no poll per message
            return 0, await self.socks[0].recv_pyobj()
        while not self._ready:
            await self.poll(None)
        sock = self._ready.pop(0)
        return self._group[sock], await sock.recv_pyobj()
