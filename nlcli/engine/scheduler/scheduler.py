"""Scheduler: the engine process's loop body (queue, batches, finish checks, aborts, books).

Each `step()` either runs a prefill ("extend") batch admitted by the schedule policy or a decode
batch of every running request; new requests join between steps (continuous batching). When a
decode step cannot get one slot per request, the newest requests are retracted to the front of the
queue and later re-prefilled from prompt + output so far (greedy output is unchanged).

`NL_TEST_RETRACT=1` forces a retraction of the newer half of the batch every third decode step, so
tests exercise the resume path deterministically. `NL_TEST_STRICT_LEAK=1` turns the idle books
check (free + evictable + protected == pool size) into an exception.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable, Optional

from nlcli.engine.detokenizer import StopChecker
from nlcli.engine.scheduler.embedding import (finish_embedding_batch, is_embedding_output,
                                          takes_whole_inputs)
from nlcli.engine.scheduler.grammar_queue import GrammarQueue, advance_grammars
from nlcli.engine.io_struct import (AbortReq, BatchTokenIDOut, FlushCacheReq, FlushCacheReqOutput,
                                    GenerationControlOutput, GenerationControlReq,
                                    TokenizedGenerateReqInput, UpdateWeightReq)
from nlcli.engine.scheduler.logprobs import (collect_input_logprobs, collect_output_logprobs,
                                            logprob_delta)
from nlcli.engine.limits import check_input_len
from nlcli.engine.mem_cache.radix_cache import RadixCache
from nlcli.engine.scheduler.req import Req
from nlcli.engine.scheduler.batch import KVMemory, prepare_decode, prepare_extend, sample_next_ids
from nlcli.engine.scheduler.policy import PrefillAdder, order_waiting
from nlcli.engine.scheduler.books import SchedulerBooks
from nlcli.engine.scheduler.weight_update import apply_weight_update

logger = logging.getLogger("nlcli.scheduler")

MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class Scheduler(SchedulerBooks):
    def __init__(self, server_args, runner, send: Callable[[object], None], tokenizer=None):
        self.args = server_args
        self.runner = runner
        self.send = send
        self._tokenizer = tokenizer  # stop strings and grammars need it; loaded on first use
        cfg = runner.model_config
        self.context_len = int(cfg.context_len)
        self.eos_ids = set(cfg.eos_token_ids or [])
        self.vocab_size = int(cfg.vocab_size)
        # Encoders (and non-last-token pooling) must see each input whole: no prefix, no chunks.
        self.whole_inputs = takes_whole_inputs(getattr(runner, "model", None))
        self.pending_update: Optional[UpdateWeightReq] = None
        self.paused = False  # /pause_generation: no step runs; requests queue until continue
        self.tree = RadixCache(runner.token_to_kv_pool_allocator,
                               disable=server_args.disable_radix_cache or self.whole_inputs)
        self.mem = KVMemory(runner, self.tree)
        rows = int(runner.req_to_token_pool.available_size())
        self.max_running_requests = min(server_args.max_running_requests or rows, rows)
        self.max_prefill_tokens = server_args.max_prefill_tokens
        self.base_ratio = 0.7 * server_args.schedule_conservativeness
        self.new_token_ratio = self.base_ratio
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Optional[Req] = None
        self.reqs: dict[str, Req] = {}
        self.grammar_queue = GrammarQueue(lambda: self.tokenizer, self.vocab_size,
                                          sorted(self.eos_ids))
        self.force_retract = os.environ.get("NL_TEST_RETRACT") == "1"
        self.strict_leak = os.environ.get("NL_TEST_STRICT_LEAK") == "1"
        # stats
        self.decode_steps = 0
        self.total_cached = 0
        self.total_prefill = 0
        self.num_retractions = 0
        self.gen_tokens_since_log = 0
        self.last_decode_log = time.monotonic()
        self.last_throughput = 0.0
        self.books_checked = True

    # ---- inputs ----------------------------------------------------------------------------
    def handle(self, msg: object) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self._add_request(msg)
        elif isinstance(msg, AbortReq):
            self._abort(msg)
        elif isinstance(msg, FlushCacheReq):
            self.send(FlushCacheReqOutput(success=self.flush_cache()))
        elif isinstance(msg, UpdateWeightReq):
            self.pending_update = msg  # applied by step() once nothing runs or waits
        elif isinstance(msg, GenerationControlReq):
            self._control(msg)
        else:
            logger.warning("scheduler: unknown message %r", type(msg).__name__)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            src = getattr(self.runner, "source", None)
            if src is None:
                from nlcli.engine.configs.model_source import resolve_model_source

                src = resolve_model_source(self.args.model_path, self.args.is_embedding,
                                           self.args.revision, self.args.download_dir)
            self._tokenizer = src.load_tokenizer(self.args.tokenizer_path)
        return self._tokenizer

    def _add_request(self, msg: TokenizedGenerateReqInput) -> None:
        req = Req(msg.rid, msg.input_ids, msg.sampling_params, stream=msg.stream,
                  return_logprob=getattr(msg, "return_logprob", False),
                  logprob_start_len=getattr(msg, "logprob_start_len", -1),
                  top_logprobs_num=getattr(msg, "top_logprobs_num", 0))
        req.token_type_ids = getattr(msg, "token_type_ids", None)
        try:  # the API process rejects these with a 400; this guards direct callers
            check_input_len(len(req.origin_input_ids), self.context_len, self.mem.size)
        except ValueError as e:
            req.finish_abort(str(e), status_code=400)
            self._emit([req])
            return
        sp = req.sampling_params
        if getattr(sp, "stop", None):
            try:
                req.stop_checker = StopChecker(self.tokenizer, req.origin_input_ids, sp)
            except Exception as e:  # no usable tokenizer in the engine
                req.finish_abort(f"Stop strings are unavailable: {e}", status_code=400)
                self._emit([req])
                return
        self.reqs[req.rid] = req
        self.books_checked = False
        if getattr(sp, "grammar", None) is not None and req.max_new_tokens != 0:
            self.grammar_queue.add(req)  # joins the waiting queue once its matcher is ready
            return
        self.waiting.append(req)

    def _abort(self, msg: AbortReq) -> None:
        targets = list(self.reqs.values()) if msg.abort_all else (
            [self.reqs[msg.rid]] if msg.rid in self.reqs else [])
        for req in targets:
            if self.grammar_queue.remove(req):
                req.finish_abort("Abort in waiting queue")
                self._finish([req])
            elif req in self.waiting:
                logger.info("Abort queued request. req.rid=%s", req.rid)
                self.waiting.remove(req)
                req.finish_abort("Abort in waiting queue")
                self._finish([req])
            else:
                logger.info("Abort running request. req.rid=%s", req.rid)
                req.to_abort = msg.message

    def _control(self, msg: GenerationControlReq) -> None:
        """Pause: `abort` ends every request, `retract` moves running ones back to the queue
        (their KV freed, recomputed after continue), `in_place` keeps them and their KV."""
        if msg.pause and msg.mode == "abort":
            self._abort(AbortReq(abort_all=True, message="Abort request"))
            self._reap_aborted()
        elif msg.pause and msg.mode == "retract" and self.running:
            self._retract(list(self.running))
        self.paused = msg.pause
        if not msg.pause and msg.torch_empty_cache:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        logger.info("Generation %s (mode=%s)", "paused" if msg.pause else "continued", msg.mode)
        self.send(GenerationControlOutput(self.paused, len(self.reqs)))

    # ---- the step --------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.grammar_queue)

    @property
    def can_run(self) -> bool:
        """Work a step can do now (requests waiting only for a grammar compile cannot run)."""
        return not self.paused and bool(self.waiting or self.running or self.chunked_req)

    @property
    def holds_kv(self) -> bool:
        """Requests own KV slots or locks (queued ones own none, retracted ones included)."""
        return bool(self.running or self.chunked_req)

    def step(self) -> bool:
        """Run one batch if there is work; returns whether anything ran."""
        self._reap_aborted()
        if self.paused:  # a weight update may run once no request holds KV (retract, abort)
            if self.pending_update is not None and not self.holds_kv:
                update, self.pending_update = self.pending_update, None
                self.send(apply_weight_update(self, update))
            return False
        if self.pending_update is not None and not self.has_work:
            update, self.pending_update = self.pending_update, None
            self.send(apply_weight_update(self, update))
        if self.grammar_queue:
            self._admit_grammars()
        if not self.has_work:
            if not self.books_checked:
                self.check_books()
            return False
        if self._run_prefill():
            return True
        if self.running:
            self._run_decode()
            return True
        return False

    def fail_in_flight(self, error: str) -> int:
        """After a step raised: fail every request the step may have touched (running, being
        prefilled or admitted) with a 500, and start the KV books afresh. The engine keeps
        serving; queued requests hold no KV and run normally. Returns how many were failed.

        Their partly written KV must never reach the radix cache, so nothing is inserted: with no
        request left holding slots, the whole pool (cached prefixes included) is simply reset."""
        untouched = {id(r) for r in self.waiting} | {id(r) for r in self.grammar_queue.pending}
        failed = [r for r in self.reqs.values() if id(r) not in untouched]
        self.running, self.chunked_req = [], None
        for r in failed:
            r.finish_abort(f"Internal error in the engine: {error}", status_code=500)
            r.req_pool_idx, r.kv_len, r.fill_ids = None, 0, []
            self.reqs.pop(r.rid, None)
        self.mem.reset()
        self.total_cached = self.total_prefill = 0
        self.books_checked = False
        self._emit(failed)
        return len(failed)

    def _admit_grammars(self) -> None:
        ready, failed = self.grammar_queue.poll()
        self.waiting.extend(ready)
        for req, message in failed:
            req.finish_abort(message, status_code=400)
        if failed:
            self._finish([r for r, _ in failed])

    def _reap_aborted(self) -> None:
        gone = [r for r in self.running if r.to_abort]
        if self.chunked_req is not None and self.chunked_req.to_abort:
            gone.append(self.chunked_req)
            self.chunked_req = None
        if gone:
            self.running = [r for r in self.running if not r.to_abort]
            for r in gone:
                r.finish_abort(r.to_abort)
            self._finish(gone)

    def _run_prefill(self) -> bool:
        if not self.waiting and self.chunked_req is None:
            return False
        adder = PrefillAdder(
            self.mem, self.running + ([self.chunked_req] if self.chunked_req else []),
            max_prefill_tokens=self.max_prefill_tokens,
            chunked_prefill_size=-1 if self.whole_inputs else self.args.chunked_prefill_size,
            max_running_requests=self.max_running_requests,
            new_token_ratio=self.new_token_ratio, context_len=self.context_len)
        continuing = self.chunked_req
        if continuing is not None:
            adder.add_chunked(continuing)
            if continuing not in adder.admitted:
                return False  # it keeps its place; running requests decode and free memory
        if adder.chunked is None:
            for req in order_waiting(list(self.waiting), self.args.schedule_policy, self.mem):
                if not adder.add(req):
                    break
        if not adder.admitted:
            return False
        batch_reqs = adder.admitted
        new = [r for r in batch_reqs if r is not continuing]
        for r in new:
            self.waiting.remove(r)
        self.chunked_req = adder.chunked
        fb = prepare_extend(self.mem, batch_reqs)
        cached = sum(r.prefix_len for r in new)
        self.total_cached += cached
        self.total_prefill += fb.num_tokens + cached
        out = self.runner.forward(fb)
        if is_embedding_output(out):  # an embedding or reward model: nothing to decode
            return finish_embedding_batch(self, batch_reqs, out, fb.num_tokens, cached)
        if fb.return_all_logits:
            collect_input_logprobs(batch_reqs, fb.extend_lens_cpu, out.all_logits)
        done = [r for r in batch_reqs if not r.is_chunked]
        for r in batch_reqs:
            if r.is_chunked:
                self.mem.cache_chunk(r)
        if done:
            idx = [batch_reqs.index(r) for r in done]
            logits = out.next_token_logits[idx]
            self._append_tokens(done, logits)
        self._log_prefill(len(batch_reqs), fb.num_tokens, cached)
        return True

    def _append_tokens(self, reqs: list[Req], logits) -> None:
        live = [r for r in reqs if r.max_new_tokens != 0]
        for r in reqs:
            if r.max_new_tokens == 0:
                r.finished_reason = {"type": "length", "length": 0}
        next_ids: list[int] = []
        if live:
            sampled = sample_next_ids(logits[[reqs.index(r) for r in live]], live, self.vocab_size,
                                      self.eos_ids)
            next_ids = sampled.next_token_ids.tolist()
            if sampled.next_token_logprobs is not None:
                collect_output_logprobs(live, sampled)
        for r, tok in zip(live, next_ids):
            r.output_ids.append(tok)
            r.check_finished(self.eos_ids, self.context_len)
        advance_grammars(live, next_ids)
        for r in live:
            r.check_stop_strings()
        self.gen_tokens_since_log += len(live)
        finished = [r for r in reqs if r.finished]
        keep = [r for r in reqs if not r.finished]
        running_ids = {id(r) for r in self.running}
        self.running.extend(r for r in keep if id(r) not in running_ids)
        self.running = [r for r in self.running if not r.finished]
        self._emit(keep)
        self._finish(finished)

    def _run_decode(self) -> None:
        self.decode_steps += 1
        self._maybe_retract()
        if not self.running:
            return
        batch = list(self.running)
        fb = prepare_decode(self.mem, batch)
        out = self.runner.forward(fb)
        self._append_tokens(batch, out.next_token_logits)
        self.new_token_ratio = max(self.new_token_ratio - NEW_TOKEN_RATIO_DECAY,
                                   MIN_NEW_TOKEN_RATIO * self.args.schedule_conservativeness)
        if self.decode_steps % max(self.args.decode_log_interval, 1) == 0:
            self._log_decode()

    # ---- retraction ------------------------------------------------------------------------
    def _maybe_retract(self) -> None:
        forced = self.force_retract and len(self.running) > 1 and self.decode_steps % 3 == 0
        if forced:
            victims = sorted(self.running, key=lambda r: r.arrival)[len(self.running) // 2:]
            self._retract(victims)
        while len(self.running) > 1 and self.mem.available() < len(self.running):
            self._retract([max(self.running, key=lambda r: r.arrival)])
        if self.running and self.mem.available() < len(self.running):
            lone = self.running[0]
            lone.finish_abort(f"The KV cache pool ({self.mem.size} tokens) is full; "
                              f"the request cannot grow past {lone.kv_len} tokens.")
            self.running = []
            self._finish([lone])

    def _retract(self, victims: list[Req]) -> None:
        for r in sorted(victims, key=lambda r: r.arrival, reverse=True):
            self.running.remove(r)
            self.mem.release(r)
            r.num_retractions += 1
            self.waiting.appendleft(r)
        self.num_retractions += len(victims)
        self.new_token_ratio = min(1.0, self.base_ratio + 0.3)
        logger.info("Retract requests. #retracted: %d, #running-req: %d, #queue-req: %d",
                    len(victims), len(self.running), len(self.waiting))

    # ---- outputs ---------------------------------------------------------------------------
    def _emit(self, reqs: list[Req]) -> None:
        interval = max(self.args.stream_interval, 1)
        ready = [r for r in reqs if r.finished or (
            r.stream and (r.num_sent == 0 or len(r.output_ids) - r.num_sent >= interval))]
        if not ready:
            return
        out = BatchTokenIDOut([], [], [], [], [], [])
        for r in ready:
            out.rids.append(r.rid)
            out.new_token_ids.append(r.output_ids[r.num_sent:])
            out.finished_reasons.append(r.finished_reason)
            out.prompt_tokens.append(len(r.origin_input_ids))
            out.completion_tokens.append(len(r.output_ids))
            out.cached_tokens.append(r.cached_tokens or 0)
            out.logprobs.append(logprob_delta(r))
            r.num_sent = len(r.output_ids)
        self.send(out)

    def _finish(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.mem.release(r)
            self.reqs.pop(r.rid, None)
        self._emit(reqs)

    # ---- cache and books -------------------------------------------------------------------
    def flush_cache(self) -> bool:
        # While paused, queued requests hold no KV (nor locks): the tree may go.
        if self.holds_kv or (self.has_work and not self.paused):
            logger.warning("Cache not flushed because there are pending requests. #queue-req: %d, "
                           "#running-req: %d", len(self.waiting) + bool(self.chunked_req),
                           len(self.running))
            return False
        self.tree.evict_all()
        self.tree.reset()
        self.total_cached = self.total_prefill = 0
        self.check_books()
        logger.info("Cache flushed successfully!")
        return True
