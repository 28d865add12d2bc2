"""The API process's sending half of the ZMQ link to the engine: pickled messages out, and the
hold a weight update puts on new generation requests (they wait here, already pickled, until
it is released)."""

from __future__ import annotations

import pickle
from typing import Optional

import zmq
import zmq.asyncio


def dumps(msg: object) -> bytes:
    return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)


class EngineLink:
    def __init__(self, ctx: zmq.asyncio.Context, addr: str):
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.connect(addr)
        self._held: Optional[list[tuple[str, bytes]]] = None

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def send_or_hold(self, rid: str, frame: bytes) -> bool:
        """Send a generation request's `frame` now (True), or keep it while held (False)."""
        if self._held is not None:
            self._held.append((rid, frame))
            return False
        self.sock.send(frame)
        return True

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def take_held(self) -> list[tuple[str, bytes]]:
        """End the hold: the (rid, frame) pairs kept meanwhile, in arrival order."""
        held, self._held = self._held or [], None
        return held
