"""How uvicorn serves connections: idle and slow clients cannot hold the server's connections.

uvicorn closes a keep-alive connection idle for `--timeout-keep-alive` seconds, but only after a
response, and any byte of a new request cancels that; a client that connects and sends nothing,
or a request's headers a byte at a time, would hold its connection forever. `HeaderTimeoutH11`
closes a connection that has not sent a complete request head within `--timeout-request-header`
seconds of connecting or of its last response. `--limit-concurrency` makes uvicorn answer 503
once that many connections or requests are open.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (`header_timeout` seconds)."""

    header_timeout: float = 30.0
    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_settings(args) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the connection limits in `args` (ServerArgs)."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,),
                    {"header_timeout": float(args.timeout_request_header)})
    return {"http": protocol, "timeout_keep_alive": args.timeout_keep_alive,
            "limit_concurrency": args.limit_concurrency}
