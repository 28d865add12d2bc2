"""TokenizerManager: the API process's link to the engine, and its side of generation.

Sends requests over ZMQ (validated and tokenized by prepare.py), turns the engine's token deltas
into cumulative text and meta_info, and aborts what clients abandon. It also watches the engine:
heartbeats, and process death (every pending request then fails at once with EngineDeadError).

It owns the table of in-flight requests. The other API-side managers use only its small public
interface: `submit_tokenized` (embeddings), `on_message` (engine answers by type), `pending`,
`in_flight`, `wedged`, `send`, and `hold_new_requests` / `release_held` (a weight update's drain).

Submission is all or nothing: a request's messages are all pickled before any is registered; a
failure while sending rolls back every state of that HTTP request (the engine aborts what it got).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable, Optional

import zmq
import zmq.asyncio

from nlcli.engine.api.engine_health import is_wedged
from nlcli.engine.api.engine_link import EngineLink, dumps
from nlcli.engine.api.native_input import GenItem
from nlcli.engine.api.prepare import import_grammar, max_chars_per_token, prepare_all
from nlcli.engine.api.req_state import EngineDeadError, ReqState
from nlcli.engine.io_struct import (AbortReq, BatchTokenIDOut, EngineReady, FlushCacheReq,
                                    FlushCacheReqOutput, Heartbeat, ShutdownReq,
                                    TokenizedGenerateReqInput)

__all__ = ["EngineDeadError", "ReqState", "TokenizerManager"]

logger = logging.getLogger("nlcli.tokenizer_manager")


class TokenizerManager:
    def __init__(self, server_args, tokenizer, send_addr: str, recv_addr: str):
        self.args = server_args
        self.ready: Optional[EngineReady] = None
        self.tokenizer = tokenizer
        self.context_len = self.pool_size = 0
        self.ctx = zmq.asyncio.Context()
        self.link = EngineLink(self.ctx, send_addr)
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.connect(recv_addr)
        self._states: dict[str, ReqState] = {}
        self.last_heartbeat = self.last_output = time.monotonic()
        self.gauges, self.gauges_at = Heartbeat(), 0.0
        self.chars_per_token = max_chars_per_token(tokenizer) if tokenizer is not None else 0
        self.dead: Optional[str] = None
        self.draining = False
        self.flush_lock = asyncio.Lock()
        self.flush_future: Optional[asyncio.Future] = None
        self.metrics = None  # EngineMetrics, set by metrics.mount_metrics (--enable-metrics)
        self._tasks: list[asyncio.Task] = []
        # Engine messages this manager does not know, by type (registered by on_message).
        self._handlers: dict[type, Callable[[object], None]] = {}

    # ---- wiring for the other API-side managers ---------------------------------------------
    def on_message(self, kind: type, handler: Callable[[object], None]) -> None:
        """Route engine messages of type `kind` to `handler` (embeddings, weight updates)."""
        self._handlers[kind] = handler

    def set_args(self, server_args) -> None:
        """The current ServerArgs (a weight update changes model_path / load_format)."""
        self.args = server_args

    def start_draining(self) -> bool:
        """Refuse new work from now on (shutdown); False when already draining."""
        was, self.draining = self.draining, True
        return not was

    # ---- lifecycle -------------------------------------------------------------------------
    async def wait_ready(self, engine_alive: Callable[[], bool], timeout: float) -> EngineReady:
        """Wait for the engine's EngineReady; RuntimeError if it dies or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.recv_sock.poll(200):
                msg = await self.recv_sock.recv_pyobj()
                if isinstance(msg, EngineReady):
                    self.ready = msg
                    self.context_len = msg.context_len
                    self.pool_size = msg.max_total_num_tokens
                    self.last_heartbeat = time.monotonic()
                    return msg
            elif not engine_alive():
                raise RuntimeError("The engine process exited during start-up (see the log above).")
        raise RuntimeError(f"The engine did not become ready within {timeout:.0f} s.")

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
        if self.flush_future and not self.flush_future.done():
            self.flush_future.set_exception(EngineDeadError(reason))

    def is_healthy(self) -> bool:
        # Beats come about once a second between steps: longer silence is one slow (hung?) step.
        stale = time.monotonic() - self.last_heartbeat > max(self.args.watchdog_timeout, 2.0)
        return self.dead is None and not self.draining and not stale and not self.wedged()

    def wedged(self) -> bool:
        """Requests sent long ago that the (heartbeating) engine says it no longer has."""
        return is_wedged((st.sent_at for st in self.in_flight() if st.sent_at is not None),
                         self.gauges, self.gauges_at, self.last_output, time.monotonic())

    def shutdown(self, message: str) -> None:
        """Abort whatever is still in flight, then ask the engine to stop."""
        self.abort(list(self._states), message)
        self.send(ShutdownReq())

    # ---- sending and holding -----------------------------------------------------------------
    def send(self, msg: object, frame: Optional[bytes] = None) -> None:
        """Send `msg` (pickled, or as its pickle `frame`) to the engine, nothing once it is dead;
        new requests wait while held."""
        if self.dead is not None:
            return
        frame = frame if frame is not None else dumps(msg)
        if not isinstance(msg, TokenizedGenerateReqInput):
            self.link.send(frame)
        elif self.link.send_or_hold(msg.rid, frame):
            self._mark_sent(msg.rid)

    def _mark_sent(self, rid: str) -> None:
        st = self._states.get(rid)
        if st is not None:
            st.sent_at = time.monotonic()

    def hold_new_requests(self) -> None:
        """Keep new requests in this process until release_held (everything else still goes)."""
        self.link.hold()

    def release_held(self) -> None:
        """Send the held requests in arrival order, except those abandoned while they waited."""
        for rid, frame in self.link.take_held():
            st = self._states.get(rid)
            if st is not None and not st.finished and self.dead is None:
                self.link.send(frame)
                self._mark_sent(rid)

    def in_flight(self) -> list[ReqState]:
        """Requests registered (sent, or held: `sent_at` None) and not finished yet."""
        return [st for st in self._states.values() if not st.finished]

    def pending(self, rid: str) -> Optional[ReqState]:
        """The unfinished request `rid`, if any (for managers that answer it themselves)."""
        st = self._states.get(rid)
        return None if st is None or st.finished else st

    def check_accepting(self) -> None:
        """EngineDeadError (a 503) when the engine is dead or the server is shutting down."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.draining:
            raise EngineDeadError("The server is shutting down.")

    def submit_tokenized(self, prepared: list[tuple[TokenizedGenerateReqInput, ReqState]]
                         ) -> list[ReqState]:
        """Register and send requests already validated and tokenized; all or none: a refused
        one (engine dead, draining, rid in use, a message that cannot be pickled) sends nothing,
        and a failure while sending rolls back every state of the request."""
        self.check_accepting()
        for msg, _ in prepared:
            if msg.rid in self._states:
                raise ValueError(f"Duplicate request ID detected: {msg.rid} (already in use).")
        try:
            frames = [dumps(msg) for msg, _ in prepared]
        except RecursionError:
            raise ValueError("The request is nested too deeply to be sent to the engine.") from None
        registered: list[ReqState] = []
        try:
            for (msg, st), frame in zip(prepared, frames):
                self._states[st.rid] = st
                registered.append(st)
                if self.args.log_requests:
                    logger.info("Request rid=%s prompt_tokens=%d max_new_tokens=%s", msg.rid,
                                len(msg.input_ids), msg.sampling_params.max_new_tokens)
                self.send(msg, frame)
        except BaseException:
            self._roll_back(registered)
            raise
        return [st for _, st in prepared]

    def _roll_back(self, states: list[ReqState]) -> None:
        """Forget `states`; the ones the engine already got are aborted there."""
        for st in states:
            self._states.pop(st.rid, None)
            st.finished = True
        for st in states:
            if st.sent_at is not None:
                self.send(AbortReq(rid=st.rid, message="Submission failed"))

    # ---- engine outputs --------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            self.last_heartbeat = now = time.monotonic()
            if not isinstance(msg, Heartbeat):
                self.last_output = now
            if isinstance(msg, BatchTokenIDOut):
                self._on_tokens(msg)
            elif isinstance(msg, Heartbeat):
                self.gauges, self.gauges_at = msg, now
                if self.metrics:
                    self.metrics.on_heartbeat(msg)
            elif isinstance(msg, FlushCacheReqOutput):
                if self.flush_future and not self.flush_future.done():
                    self.flush_future.set_result(msg.success)
            elif type(msg) in self._handlers:
                self._handlers[type(msg)](msg)

    def _on_tokens(self, msg: BatchTokenIDOut) -> None:
        now = time.perf_counter()
        for i, rid in enumerate(msg.rids):
            st = self._states.get(rid)
            if st is None or st.finished:
                continue
            out, gap = st.apply(msg, i, now)
            if gap is not None and self.metrics and not rid.startswith("HEALTH_CHECK"):
                self.metrics.on_tokens(gap, len(msg.new_token_ids[i]))
            if out["meta_info"]["finish_reason"] is not None:
                self._on_finish(st, out["meta_info"])
                st.finish(out)
            elif st.stream:
                st.queue.put_nowait(out)

    def _on_finish(self, st: ReqState, meta: dict) -> None:
        if self.args.log_requests:
            logger.info("Finish rid=%s prompt_tokens=%d completion_tokens=%d finish_reason=%s",
                        st.rid, meta["prompt_tokens"], meta["completion_tokens"],
                        meta["finish_reason"])
        if self.metrics and not st.rid.startswith("HEALTH_CHECK"):
            self.metrics.on_finish(st, meta)

    # ---- requests --------------------------------------------------------------------------
    async def submit(self, items: list[GenItem], stream: bool) -> list[ReqState]:
        """Validate all items first (a bad one rejects the whole batch), then send them."""
        self.check_accepting()
        prepared = await prepare_all(items, stream, self.tokenizer, self.ready, self.context_len,
                                     self.pool_size, self.chars_per_token,
                                     self.args.enable_custom_logit_processor)
        return self.submit_tokenized(prepared)

    async def next_output(self, st: ReqState) -> dict:
        out = await st.queue.get()
        if isinstance(out, Exception):
            self._states.pop(st.rid, None)
            raise out
        if st.finished and st.queue.empty():
            self._states.pop(st.rid, None)
        return out

    async def outputs(self, st: ReqState) -> AsyncIterator[dict]:
        while True:
            out = await self.next_output(st)
            yield out
            if out["meta_info"]["finish_reason"] is not None:
                return

    def abort(self, rids: list[str], message: str = "Abort request") -> None:
        for rid in rids:
            st = self._states.pop(rid, None)
            if st is not None and not st.finished:
                st.finished = True
                self.send(AbortReq(rid=rid, message=message))

    def request_abort(self, rid: str) -> None:
        """/abort_request: the engine finishes the request with an abort the waiter still sees."""
        self.send(AbortReq(rid=rid, message="Abort request"))

    def abort_all(self) -> None:
        self.send(AbortReq(abort_all=True, message="Abort request"))

    async def flush_cache(self) -> bool:
        async with self.flush_lock:
            self.flush_future = asyncio.get_running_loop().create_future()
            self.send(FlushCacheReq())
            return await asyncio.wait_for(self.flush_future, timeout=60)
