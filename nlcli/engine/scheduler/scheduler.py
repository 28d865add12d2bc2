"""Scheduler: the engine process's loop body. Receive, choose prefill or decode, step.

Each `step()` runs a prefill ("extend") batch admitted by the schedule policy, else a decode batch
of every running request; new requests join between steps (continuous batching). With mixed chunk
(`ServerArgs.mixed_chunk`, on for CPU) running requests' decode tokens ride in prefill forwards.
When a decode step cannot get one slot per request, the newest requests are retracted to the front
of the queue and later re-prefilled from prompt + output so far (greedy output is unchanged). Its
parts are owned objects: `RequestIntake` (intake.py), `KVMemory` (cache.py), `OutputProcessor`
(output.py: appends, finish checks, emits, the live-request table), `SchedulerBooks` (books.py),
`GrammarQueue` (grammar_queue.py), `RequestLimits` (timeouts.py) and `StepControl` (control.py:
when a weight update may run, /pause_generation's pause).
`NL_TEST_RETRACT=1` forces a retraction of the newer half of the batch every third decode step.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable, Optional

from nlcli.engine.configs.model_source import resolve_model_source
from nlcli.engine.io_struct import (AbortReq, FlushCacheReq, FlushCacheReqOutput,
                                    GenerationControlReq, Heartbeat, TokenizedGenerateReqInput,
                                    UpdateWeightReq)
from nlcli.engine.scheduler.abort import abort_requests
from nlcli.engine.scheduler.batch import prepare_decode, prepare_extend
from nlcli.engine.scheduler.books import SchedulerBooks
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.control import StepControl
from nlcli.engine.scheduler.embedding import (finish_embedding_batch, is_embedding_output,
                                              takes_whole_inputs)
from nlcli.engine.scheduler.grammar_queue import GrammarQueue
from nlcli.engine.scheduler.intake import RequestIntake
from nlcli.engine.scheduler.logprobs import collect_input_logprobs
from nlcli.engine.scheduler.output import OutputProcessor
from nlcli.engine.scheduler.policy import (NewTokenRatio, PrefillAdder, admit_prefill, retract,
                                           retract_for_decode)
from nlcli.engine.scheduler.req import Req
from nlcli.engine.scheduler.timeouts import RequestLimits
from nlcli.engine.scheduler.weight_update import apply_weight_update

logger = logging.getLogger("nlcli.scheduler")


class Scheduler:
    def __init__(self, server_args, runner, send: Callable[[object], None], tokenizer=None):
        self.args = server_args
        self.runner = runner
        self.send = send
        self._tokenizer = tokenizer  # stop strings and grammars need it; loaded on first use
        cfg = runner.model_config
        self.context_len = int(cfg.context_len)
        eos_ids = set(cfg.eos_token_ids or [])
        # Encoders (and non-last-token pooling) must see each input whole: no prefix, no chunks.
        self.whole_inputs = takes_whole_inputs(runner.model)
        self.mem = KVMemory(runner, server_args.disable_radix_cache or self.whole_inputs)
        self.books = SchedulerBooks(self.mem, strict=os.environ.get("NL_TEST_STRICT_LEAK") == "1")
        self.outputs = OutputProcessor(self.mem, send, eos_ids=eos_ids,
                                       context_len=self.context_len, vocab_size=int(cfg.vocab_size),
                                       stream_interval=server_args.stream_interval)
        self.grammar_queue = GrammarQueue(lambda: self.tokenizer, int(cfg.vocab_size),
                                          sorted(eos_ids))
        rows = int(runner.req_to_token_pool.available_size())
        self.max_running_requests = min(server_args.max_running_requests or rows, rows)
        self.max_prefill_tokens = server_args.prefill_token_budget(runner.device.type)
        # Encoders' requests never decode, so there is nothing to mix in.
        self.mixed_chunk = server_args.mixed_chunk(runner.device.type) and not self.whole_inputs
        self.new_token_ratio = NewTokenRatio(server_args.schedule_conservativeness)
        self.limits = RequestLimits(server_args)  # deadlines, queue cap, admission clip
        self.intake = RequestIntake(  # builds and checks each new request
            self.limits, context_len=self.context_len, pool_size=self.mem.size,
            vocab_size=int(cfg.vocab_size), tokenizer=lambda: self.tokenizer,
            custom_logit_processors=server_args.enable_custom_logit_processor)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Optional[Req] = None
        self.control = StepControl(send)  # a pending weight update; /pause_generation
        self.force_retract = os.environ.get("NL_TEST_RETRACT") == "1"

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # the runner's model source, or (a fake runner) found afresh
            a = self.args
            src = self.runner.source or resolve_model_source(a.model_path, a.is_embedding,
                                                             a.revision, a.download_dir)
            self._tokenizer = src.load_tokenizer(a.tokenizer_path)
        return self._tokenizer

    # ---- receive ---------------------------------------------------------------------------
    def handle(self, msg: object) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self._add_request(msg)
        elif isinstance(msg, AbortReq):
            self._abort(msg)
        elif isinstance(msg, FlushCacheReq):
            self.send(FlushCacheReqOutput(success=self.flush_cache()))
        elif isinstance(msg, UpdateWeightReq):
            self.control.queue_update(msg)  # applied by step() once nothing runs or waits
        elif isinstance(msg, GenerationControlReq):  # the pause mode's work, then the answer
            if msg.pause and msg.mode == "abort":
                self._abort(AbortReq(abort_all=True, message="Abort request"))
                self._reap_aborted()
            elif msg.pause and msg.mode == "retract" and self.running:
                self._count_retracted(retract(list(self.running), self.running, self.waiting,
                                              self.mem))
            self.control.apply(msg, len(self.outputs.live()))
        else:
            logger.warning("scheduler: unknown message %r", type(msg).__name__)

    def _add_request(self, msg: TokenizedGenerateReqInput) -> None:
        req, refused = self.intake.build(msg, len(self.waiting) + len(self.grammar_queue))
        if refused is not None:
            return self.outputs.refuse(req, *refused)
        self.outputs.track(req)
        self.books.checked = False
        if req.sampling_params.grammar is not None and req.max_new_tokens != 0:
            self.grammar_queue.add(req)  # joins the waiting queue once its matcher is ready
            return
        self.waiting.append(req)

    def _abort(self, msg: AbortReq) -> None:
        abort_requests(msg, self.outputs, self.waiting, self.grammar_queue)

    # ---- choose and step -------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.grammar_queue)

    @property
    def can_run(self) -> bool:
        """Work a step can do now (requests waiting only for a grammar compile cannot run)."""
        return not self.control.paused and bool(self.waiting or self.running or self.chunked_req)

    def step(self) -> bool:
        """Run one batch if there is work; returns whether anything ran."""
        self._reap_aborted()
        if self.limits.any_timeout:  # past a deadline: a 503, and the KV is freed
            gone, self.chunked_req = self.limits.expire(self.waiting, self.running, self.chunked_req)
            self.running = [r for r in self.running if not r.finished]
            self.outputs.finish(gone)
        update = self.control.take_update(self.has_work, bool(self.running or self.chunked_req))
        if update is not None:
            answer, self.args = apply_weight_update(self.runner, self.args, update,
                                                    self.flush_cache)
            self.send(answer)
        if self.control.paused:
            return False
        if self.grammar_queue:
            self.waiting.extend(self.grammar_queue.admit(self.outputs.finish))
        if not self.has_work:
            if not self.books.checked:
                self.books.check()
            return False
        if self._run_prefill():
            return True
        if self.running:
            self._run_decode()
            return True
        return False

    def _reap_aborted(self) -> None:
        gone = [r for r in self.running if r.to_abort]
        if self.chunked_req is not None and self.chunked_req.to_abort:
            gone.append(self.chunked_req)
            self.chunked_req = None
        self.running = [r for r in self.running if not r.to_abort]
        for r in gone:
            r.finish_abort(r.to_abort)
        self.outputs.finish(gone)

    def _admit_prefill(self) -> tuple[list[Req], list[Req]]:
        """The next prefill batch (none: decode instead) and the running requests that decode in
        the same forward; updates the chunked request."""
        # Mixed batch: running requests take one token each of the budget, if that leaves most.
        mixing = self.mixed_chunk and 0 < len(self.running) <= self.max_prefill_tokens // 2
        adder = PrefillAdder(
            self.mem, self.running + ([self.chunked_req] if self.chunked_req else []),
            max_prefill_tokens=self.max_prefill_tokens,
            chunked_prefill_size=-1 if self.whole_inputs else self.args.chunked_prefill_size,
            max_running_requests=self.max_running_requests,
            new_token_ratio=self.new_token_ratio.value, context_len=self.context_len,
            clip_max_new_tokens=self.limits.clip_max_new_tokens,
            mixed_decodes=len(self.running) if mixing else 0)
        batch, self.chunked_req = admit_prefill(adder, self.chunked_req, list(self.waiting),
                                                self.args.schedule_policy)
        return batch, list(self.running) if mixing and batch else []

    def _run_prefill(self) -> bool:
        if not self.waiting and self.chunked_req is None:
            return False
        continuing = self.chunked_req
        batch, decoding = self._admit_prefill()
        if not batch:
            return False
        new = [r for r in batch if r is not continuing]
        now = time.monotonic()
        for r in new:
            self.waiting.remove(r)
            r.started_at = r.started_at or now  # --running-timeout counts from the first prefill
        fb = prepare_extend(self.mem, batch, decoding)
        cached = sum(r.prefix_len for r in new)
        new_tokens = fb.num_tokens - len(decoding)
        self.books.count_prefill(new_tokens, cached)
        out = self.runner.forward(fb)
        if is_embedding_output(out):  # an embedding or reward model: nothing to decode
            finish_embedding_batch(batch, out, self.mem, self.outputs)
        else:
            if fb.return_all_logits:  # decode rows, if any, follow the extends' rows
                collect_input_logprobs(batch, fb.extend_lens_cpu, out.all_logits)
            done = [i for i, r in enumerate(batch) if not r.is_chunked]
            rows = done + list(range(len(batch), len(batch) + len(decoding)))
            if rows:
                self._append_tokens([batch[i] for i in done] + decoding, out.next_token_logits,
                                    rows)
            # Into the radix cache now, so sharers admitted next step reuse it; after sampling,
            # so a request that failed there (row gone) has its KV discarded, not cached.
            for r in batch:
                if r.req_pool_idx is not None and (r.is_chunked or self.mem.caching):
                    self.mem.cache_prefill(r)
            if decoding:
                self.new_token_ratio.decay()
        self.books.log_prefill(len(batch), new_tokens, cached, len(self.running),
                               len(self.waiting) + bool(self.chunked_req))
        return True

    def _run_decode(self) -> None:
        self.books.decode_steps += 1
        self._maybe_retract()
        if not self.running:
            return
        batch = list(self.running)
        out = self.runner.forward(prepare_decode(self.mem, batch))
        self._append_tokens(batch, out.next_token_logits)
        self.new_token_ratio.decay()
        if self.books.decode_steps % max(self.args.decode_log_interval, 1) == 0:
            self.books.log_decode(len(self.running), len(self.waiting))

    def _append_tokens(self, reqs: list[Req], logits, rows: Optional[list[int]] = None) -> None:
        """One sampled token each; finished requests leave, new ones join the running batch."""
        keep = self.outputs.append_tokens(reqs, logits, rows)
        self.books.count_generated(sum(r.max_new_tokens != 0 for r in reqs))
        known = {id(r) for r in self.running}
        self.running = [r for r in self.running if not r.finished] + [
            r for r in keep if id(r) not in known]

    # ---- retraction ------------------------------------------------------------------------
    def _maybe_retract(self) -> None:
        forced = self.force_retract and len(self.running) > 1 and self.books.decode_steps % 3 == 0
        retracted, stuck = retract_for_decode(self.running, self.waiting, self.mem, forced)
        self._count_retracted(retracted)
        if stuck is not None:
            stuck.finish_abort(f"The KV cache pool ({self.mem.size} tokens) is full; "
                               f"the request cannot grow past {stuck.kv_len} tokens.")
            self.running = []
            self.outputs.finish([stuck])

    def _count_retracted(self, n: int) -> None:
        if n:  # admission was too optimistic: expect more of the remaining budget to be used
            self.books.count_retractions(n)
            self.new_token_ratio.after_retraction()
            logger.info("Retract requests. #retracted: %d, #running-req: %d, #queue-req: %d",
                        n, len(self.running), len(self.waiting))

    # ---- failures, cache and books ---------------------------------------------------------
    def fail_in_flight(self, error: str) -> int:
        """After a step raised: fail every request the step may have touched (running, being
        prefilled or admitted) with a 500; queued ones hold no KV and run normally. Their partly
        written KV must never reach the radix cache, so nothing is inserted: with no request left
        holding slots, the whole pool (cached prefixes too) is reset. Returns how many failed."""
        untouched = {id(r) for r in self.waiting} | {id(r) for r in self.grammar_queue.pending}
        failed = [r for r in self.outputs.live() if id(r) not in untouched]
        self.running, self.chunked_req = [], None
        self.outputs.fail(failed, f"Internal error in the engine: {error}", status_code=500)
        self.mem.reset()
        self.books.reset_hits()
        return len(failed)

    def flush_cache(self) -> bool:
        if not self.control.flush_allowed(self.has_work, bool(self.running or self.chunked_req)):
            logger.warning("Cache not flushed because there are pending requests. #queue-req: %d, "
                           "#running-req: %d", len(self.waiting) + bool(self.chunked_req),
                           len(self.running))
            return False
        self.mem.flush()
        self.books.reset_hits()
        self.books.check()
        logger.info("Cache flushed successfully!")
        return True

    def heartbeat(self) -> Heartbeat:
        queued = len(self.waiting) + bool(self.chunked_req)
        return self.books.heartbeat(len(self.running), queued, len(self.grammar_queue))
