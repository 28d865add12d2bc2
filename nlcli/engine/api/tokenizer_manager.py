"""TokenizerManager: the API process's side of generation.

Turns a native /generate body into engine requests (validation, tokenization, batch and n>1
expansion, length checks), sends them over ZMQ, turns the engine's token deltas into cumulative
text and meta_info, and aborts what clients abandon. It also watches the engine: heartbeats, and
process death (every pending request then fails at once with EngineDeadError).
"""

from __future__ import annotations

import asyncio
import logging
import time
import threading
import uuid
from typing import AsyncIterator, Callable, Optional

import zmq
import zmq.asyncio

from nlcli.engine.detokenizer import IncrementalDetokenizer
from nlcli.engine.api.native_input import GenItem
from nlcli.engine.io_struct import (AbortReq, BatchTokenIDOut, EngineReady, FlushCacheReq,
                                    FlushCacheReqOutput, Heartbeat, TokenizedGenerateReqInput)
from nlcli.engine.limits import check_input_len
from nlcli.engine.api.logprobs import LogprobAccumulator
from nlcli.engine.sampling.params import SamplingParams

logger = logging.getLogger("nlcli.tokenizer_manager")

HEALTH_CHECK_TIMEOUT = 20.0


class EngineDeadError(RuntimeError):
    pass


class ReqState:
    def __init__(self, rid: str, prompt_len: int, detok: IncrementalDetokenizer, stream: bool,
                 logprobs: Optional[LogprobAccumulator] = None):
        self.rid = rid
        self.prompt_len = prompt_len
        self.detok = detok
        self.stream = stream
        self.logprobs = logprobs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.created = time.perf_counter()
        self.first_token_time: Optional[float] = None


def _visible_ids(ids: list[int], finish: Optional[dict], no_stop_trim: bool) -> list[int]:
    """The ids whose text the client sees: a matched stop token (EOS, stop_token_ids, a grammar's
    end) is cut unless no_stop_trim, as upstream trims it (it always arrives last)."""
    if (finish and finish.get("type") == "stop" and not no_stop_trim and ids
            and isinstance(finish.get("matched"), int) and not isinstance(finish["matched"], bool)):
        return ids[:-1]
    return ids


def _import_grammar() -> None:
    try:
        import nlcli.engine.sampling.grammar  # noqa: F401
    except Exception as e:  # requests with a grammar will report it
        logger.warning("Structured output unavailable: %s", e)


class TokenizerManager:
    def __init__(self, server_args, tokenizer, send_addr: str, recv_addr: str):
        self.args = server_args
        self.ready: Optional[EngineReady] = None
        self.tokenizer = tokenizer
        self.context_len = self.pool_size = 0
        self.ctx = zmq.asyncio.Context()
        self.send_sock = self.ctx.socket(zmq.PUSH)
        self.send_sock.connect(send_addr)
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.connect(recv_addr)
        self.states: dict[str, ReqState] = {}
        self.last_heartbeat = time.monotonic()
        self.gauges = Heartbeat()
        self.dead: Optional[str] = None
        self.draining = False
        self.flush_lock = asyncio.Lock()
        self.flush_future: Optional[asyncio.Future] = None
        self.metrics = None  # set by http_server when --enable-metrics
        self._tasks: list[asyncio.Task] = []
        # Extensions (embedding_manager, weight_update_manager): engine messages by type, and a
        # filter that may hold outgoing messages back (returns False) while a weight update runs.
        self.handlers: dict[type, Callable[[object], None]] = {}
        self.send_filter: Optional[Callable[[object], bool]] = None

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
            threading.Thread(target=_import_grammar, daemon=True, name="grammar-import").start()
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
        logger.error("%s Failing %d pending request(s).", reason, len(self.states))
        for st in self.states.values():
            st.queue.put_nowait(EngineDeadError(reason))
        if self.flush_future and not self.flush_future.done():
            self.flush_future.set_exception(EngineDeadError(reason))

    def is_healthy(self) -> bool:
        stale = time.monotonic() - self.last_heartbeat > max(self.args.watchdog_timeout, 10.0)
        return self.dead is None and not self.draining and not stale

    def send(self, msg: object) -> None:
        """Send a control message to the engine (dropped once it is dead)."""
        self._send(msg)

    def _send(self, msg: object) -> None:
        if self.dead is None:
            if self.send_filter is not None and not self.send_filter(msg):
                return
            self.send_sock.send_pyobj(msg)

    # ---- engine outputs --------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            self.last_heartbeat = time.monotonic()
            if isinstance(msg, BatchTokenIDOut):
                self._on_tokens(msg)
            elif isinstance(msg, Heartbeat):
                self.gauges = msg
                if self.metrics:
                    self.metrics.on_heartbeat(msg)
            elif isinstance(msg, FlushCacheReqOutput):
                if self.flush_future and not self.flush_future.done():
                    self.flush_future.set_result(msg.success)
            elif type(msg) in self.handlers:
                self.handlers[type(msg)](msg)

    def _on_tokens(self, msg: BatchTokenIDOut) -> None:
        now = time.perf_counter()
        for i, rid in enumerate(msg.rids):
            st = self.states.get(rid)
            if st is None or st.finished:
                continue
            finish = msg.finished_reasons[i]
            st.detok.add(_visible_ids(msg.new_token_ids[i], finish, st.detok.no_stop_trim),
                         final=finish is not None)
            if finish is None and st.detok.matched_stop is not None:
                finish = {"type": "stop", "matched": st.detok.matched_stop}
                self._send(AbortReq(rid=rid, message="stop string matched"))
            if st.first_token_time is None and msg.completion_tokens[i]:
                st.first_token_time = now
            text = st.detok.text if finish is not None else st.detok.visible_text()
            meta = {"id": rid, "finish_reason": finish, "prompt_tokens": msg.prompt_tokens[i]}
            if st.logprobs is not None:
                st.logprobs.add(msg.logprobs[i] if i < len(msg.logprobs) else None,
                                msg.new_token_ids[i])
                meta.update(st.logprobs.meta())
            meta.update(completion_tokens=msg.completion_tokens[i],
                        cached_tokens=msg.cached_tokens[i], e2e_latency=now - st.created)
            out = {"text": text, "meta_info": meta}
            if finish is not None:
                st.finished = True
                if self.metrics and not rid.startswith("HEALTH_CHECK"):
                    self.metrics.on_finish(st, out["meta_info"])
            if st.stream or finish is not None:
                st.queue.put_nowait(out)

    # ---- requests --------------------------------------------------------------------------
    def _prepare(self, item: GenItem, stream: bool) -> tuple[TokenizedGenerateReqInput, ReqState]:
        if item.input_ids is not None:
            ids = item.input_ids
            bad = [t for t in ids if t < 0 or (self.ready.vocab_size and t >= self.ready.vocab_size)]
            if bad:
                raise ValueError(f"input_ids contains {bad[0]}, which is out of the vocabulary "
                                 f"(size {self.ready.vocab_size}).")
        else:
            ids = self.tokenizer.encode(item.text)
        n = len(ids)
        check_input_len(n, self.context_len, self.pool_size)
        sp = SamplingParams.from_dict(item.sampling)
        if self.ready.vocab_size:
            sp.verify_token_ids(self.ready.vocab_size)
        if sp.grammar is not None:
            from nlcli.engine.sampling.grammar import validate_grammar

            validate_grammar(*sp.grammar)  # a bad grammar is a 400 here, never in the engine
        logprobs = None
        if item.return_logprob:
            from nlcli.engine.sampling.logprobs import verify_logprob_args

            verify_logprob_args(item.logprob_start_len, item.top_logprobs_num, n)
            logprobs = LogprobAccumulator(self.tokenizer, item.top_logprobs_num,
                                          item.return_text_in_logprobs)
        room = min(self.context_len, self.pool_size) - n - 1
        if sp.max_new_tokens is None or sp.max_new_tokens > room:
            sp.max_new_tokens = max(room, 0)
            sp.min_new_tokens = min(sp.min_new_tokens, sp.max_new_tokens)
        if item.rid in self.states:
            raise ValueError(f"rid {item.rid!r} is already in use.")
        detok = IncrementalDetokenizer(self.tokenizer, ids, sp.skip_special_tokens,
                                       sp.spaces_between_special_tokens, sp.stop, sp.no_stop_trim)
        msg = TokenizedGenerateReqInput(
            item.rid, list(ids), sp, stream, return_logprob=item.return_logprob,
            logprob_start_len=item.logprob_start_len, top_logprobs_num=item.top_logprobs_num)
        return msg, ReqState(item.rid, n, detok, stream, logprobs)

    def submit(self, items: list[GenItem], stream: bool) -> list[ReqState]:
        """Validate all items first (a bad one rejects the whole batch), then send them."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.draining:
            raise EngineDeadError("The server is shutting down.")
        prepared = [self._prepare(it, stream) for it in items]
        for msg, st in prepared:
            self.states[st.rid] = st
            self._send(msg)
        return [st for _, st in prepared]

    async def next_output(self, st: ReqState) -> dict:
        out = await st.queue.get()
        if isinstance(out, Exception):
            self.states.pop(st.rid, None)
            raise out
        if st.finished and st.queue.empty():
            self.states.pop(st.rid, None)
        return out

    async def outputs(self, st: ReqState) -> AsyncIterator[dict]:
        while True:
            out = await self.next_output(st)
            yield out
            if out["meta_info"]["finish_reason"] is not None:
                return

    def abort(self, rids: list[str], message: str = "Abort request") -> None:
        for rid in rids:
            st = self.states.pop(rid, None)
            if st is not None and not st.finished:
                st.finished = True
                self._send(AbortReq(rid=rid, message=message))

    def request_abort(self, rid: str) -> None:
        """/abort_request: the engine finishes the request with an abort the waiter still sees."""
        self._send(AbortReq(rid=rid, message="Abort request"))

    def abort_all(self) -> None:
        self._send(AbortReq(abort_all=True, message="Abort request"))

    async def flush_cache(self) -> bool:
        async with self.flush_lock:
            self.flush_future = asyncio.get_running_loop().create_future()
            self._send(FlushCacheReq())
            return await asyncio.wait_for(self.flush_future, timeout=60)

    async def health_generate(self) -> bool:
        if not self.is_healthy():
            return False
        rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
        item = GenItem(None, [0], {"max_new_tokens": 1, "temperature": 0.7}, rid)
        try:
            (st,) = self.submit([item], stream=True)
            await asyncio.wait_for(self.next_output(st), timeout=HEALTH_CHECK_TIMEOUT)
            return True
        except (asyncio.TimeoutError, EngineDeadError, ValueError):
            return False
        finally:
            self.abort([rid], "health check done")
