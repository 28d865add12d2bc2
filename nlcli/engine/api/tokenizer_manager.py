"""TokenizerManager: the API process's link to the engine groups, and its side of generation.

Sends requests over ZMQ (validated and tokenized by prepare.py), turns the engine's token deltas
into cumulative text and meta_info, and aborts what clients abandon. It also watches the engine:
heartbeats, and process death (every pending request then fails at once with EngineDeadError).
With --dp-size N it talks to N engine groups: each request goes to the group the router picks
(api/dp/router.py), control messages go to every group and their answers are merged (dp/fan_in.py),
and health is per group (dp/groups.py).

It owns the table of in-flight requests. The other API-side managers use only its small public
interface: `submit_tokenized` (embeddings), `on_message` (engine answers by type), `pending`,
`in_flight`, `wedged`, `send`, and `hold_new_requests` / `release_held` (a weight update's drain).

Submission is all or nothing: a request's messages are all pickled before any is registered; a
failure while sending rolls back every state of that HTTP request (the engine aborts what it got).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, Optional

import zmq
import zmq.asyncio

from nlcli.engine.api.dp.fan_in import ReplyGather
from nlcli.engine.api.dp.groups import EngineGroups
from nlcli.engine.api.dp.router import make_router
from nlcli.engine.api.engine_link import EngineInbox, EngineLink, dumps
from nlcli.engine.api.engine_watch import EngineWatch
from nlcli.engine.api.native_input import GenItem
from nlcli.engine.api.prepare import max_chars_per_token, prepare_all
from nlcli.engine.api.req_state import EngineDeadError, ReqState
from nlcli.engine.io_struct import (AbortReq, BatchTokenIDOut, EngineReady, FlushCacheReqOutput,
                                    Heartbeat, ShutdownReq,
                                    TokenizedGenerateReqInput, UpdateWeightReqOutput)

__all__ = ["EngineDeadError", "ReqState", "TokenizerManager"]

logger = logging.getLogger("nlcli.tokenizer_manager")


class TokenizerManager(EngineWatch):
    def __init__(self, server_args, tokenizer, send_addr: str | list[str],
                 recv_addr: str | list[str]):
        """One address each, or one per engine group (--dp-size)."""
        send_addrs = [send_addr] if isinstance(send_addr, str) else list(send_addr)
        recv_addrs = [recv_addr] if isinstance(recv_addr, str) else list(recv_addr)
        self.args = server_args
        self.ready: Optional[EngineReady] = None
        self.tokenizer = tokenizer
        self.context_len = self.pool_size = 0
        self.ctx = zmq.asyncio.Context()
        self.link = EngineLink(self.ctx, send_addrs)
        self.inbox = EngineInbox(self.ctx, recv_addrs)
        self.groups = EngineGroups(len(send_addrs))
        self.router = make_router(server_args.load_balance_method, len(send_addrs))
        self._replies = ReplyGather(len(send_addrs))
        self._states: dict[str, ReqState] = {}
        self.chars_per_token = max_chars_per_token(tokenizer) if tokenizer is not None else 0
        self.dead: Optional[str] = None
        self.draining = False
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

    def shutdown(self, message: str) -> None:
        """Abort whatever is still in flight, then ask the engine to stop."""
        self.abort(list(self._states), message)
        self.send(ShutdownReq())

    # ---- sending and holding -----------------------------------------------------------------
    def send(self, msg: object, frame: Optional[bytes] = None) -> None:
        """Send `msg` (pickled, or as its pickle `frame`) to the engine, nothing once it is dead;
        new requests go to the group chosen for them and wait while held, anything else goes to
        every group."""
        if self.dead is not None:
            return
        frame = frame if frame is not None else dumps(msg)
        if not isinstance(msg, TokenizedGenerateReqInput):
            self._replies.expect(msg)
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
        for rid, frame, group in self.link.take_held():
            st = self._states.get(rid)
            if st is not None and not st.finished and self.dead is None:
                self.link.send_to(group, frame)
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

    def submit_tokenized(self, prepared: list[tuple[TokenizedGenerateReqInput, ReqState]],
                         group: Optional[int] = None) -> list[ReqState]:
        """Register and send requests already validated and tokenized (to the router's groups, or
        all to `group`); all or none: a refused one (engine dead, draining, rid in use, a message
        that cannot be pickled) sends nothing, and a failure while sending rolls back every
        state of the request."""
        self.check_accepting()
        for msg, _ in prepared:
            if msg.rid in self._states:
                raise ValueError(f"Duplicate request ID detected: {msg.rid} (already in use).")
        try:
            frames = [dumps(msg) for msg, _ in prepared]
        except RecursionError:
            raise ValueError("The request is nested too deeply to be sent to the engine.") from None
        registered: list[ReqState] = []
        loads = self.groups.loads(self.in_flight()) if len(self.groups) > 1 else [0]
        try:
            for (msg, st), frame in zip(prepared, frames):
                if len(self.groups) > 1:
                    st.group = self.router.choose(msg.input_ids, loads) if group is None else group
                    loads[st.group] += 1
                    self.link.assign(msg.rid, st.group)
                self.groups.routed(st.group)
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
                self._send_abort(st, "Submission failed")

    # ---- engine outputs --------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            group, msg = await self.inbox.recv()
            self.groups.heard(group, msg)
            if isinstance(msg, ReplyGather.KINDS):
                msg = self._replies.add(group, msg)  # None until every group answered
                if isinstance(msg, (FlushCacheReqOutput, UpdateWeightReqOutput)) and msg.success:
                    self.router.forget()  # the groups' prefix caches are empty now
            if isinstance(msg, BatchTokenIDOut):
                self._on_tokens(msg)
            elif isinstance(msg, Heartbeat):
                if self.metrics:
                    self.metrics.on_heartbeat(self.gauges)
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
        if not st.rid.startswith("HEALTH_CHECK"):
            self.groups.finished(st.group, meta)
            if self.metrics:
                self.metrics.on_finish(st, meta)

    # ---- requests --------------------------------------------------------------------------
    async def submit(self, items: list[GenItem], stream: bool,
                     group: Optional[int] = None) -> list[ReqState]:
        """Validate all items first (a bad one rejects the whole batch), then send them (all to
        engine group `group` if given)."""
        self.check_accepting()
        prepared = await prepare_all(items, stream, self.tokenizer, self.ready, self.context_len,
                                     self.pool_size, self.chars_per_token,
                                     self.args.enable_custom_logit_processor)
        return self.submit_tokenized(prepared, group)

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
                self._send_abort(st, message)

    def _send_abort(self, st: ReqState, message: str) -> None:
        """Abort `st` in the one group it was sent to."""
        if self.dead is None:
            self.link.send_to(st.group, dumps(AbortReq(rid=st.rid, message=message)))

    def request_abort(self, rid: str) -> None:
        """/abort_request: the engine finishes the request with an abort the waiter still sees
        (sent to every group when the rid is not, or no longer, known here)."""
        st = self._states.get(rid)
        if st is not None:
            self._send_abort(st, "Abort request")
        else:
            self.send(AbortReq(rid=rid, message="Abort request"))

    def abort_all(self) -> None:
        self.send(AbortReq(abort_all=True, message="Abort request"))
