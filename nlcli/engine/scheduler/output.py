"""OutputProcessor: the engine's table of live requests and everything that leaves for the API.

After a forward it appends each request's sampled token and runs the finish checks in order
(length and EOS, then the grammar, then stop strings), gathers output logprobs, and emits
`BatchTokenIDOut` deltas (every `stream_interval` tokens for streams, once at the end otherwise).
A request whose sampling fails (the sampler raised for it, its logits were unusable, or its id is
outside the vocabulary) is failed alone with a 500; the rest of the batch goes on.
Finishing a request releases its KV memory and forgets it. Embedding rows leave as
`BatchEmbeddingOut` through the same object.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from nlcli.engine.io_struct import BatchEmbeddingOut, BatchTokenIDOut
from nlcli.engine.sampling.sampler import INVALID_TOKEN
from nlcli.engine.scheduler.batch import sample_each
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.grammar_queue import advance_grammars
from nlcli.engine.scheduler.logprobs import (collect_output_logprobs, collect_scoring_logprobs,
                                             logprob_delta)
from nlcli.engine.scheduler.req import Req

logger = logging.getLogger("nlcli.scheduler")


class OutputProcessor:
    def __init__(self, mem: KVMemory, send: Callable[[object], None], *, eos_ids: set[int],
                 context_len: int, vocab_size: int, stream_interval: int):
        self.mem = mem
        self.send = send
        self.eos_ids = eos_ids
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.stream_interval = max(stream_interval, 1)
        self._live: dict[str, Req] = {}

    # ---- the table of live requests ------------------------------------------------------
    def track(self, req: Req) -> None:
        self._live[req.rid] = req

    def find(self, rid: str) -> Optional[Req]:
        return self._live.get(rid)

    def live(self) -> list[Req]:
        return list(self._live.values())

    # ---- after a forward -----------------------------------------------------------------
    def append_tokens(self, reqs: list[Req], logits: torch.Tensor,
                      rows: Optional[list[int]] = None) -> list[Req]:
        """Sample, append and check one token for each of `reqs`; `logits[rows[i]]` (default
        row i) belongs to reqs[i]. Emits and finishes; returns the requests that keep running."""
        rows = list(range(len(reqs))) if rows is None else rows
        live = [row for row, r in zip(rows, reqs) if r.max_new_tokens != 0]
        for r in reqs:
            if r.max_new_tokens == 0:  # scoring only: the prefill was all it asked for
                r.finished_reason = {"type": "length", "length": 0}
        collect_scoring_logprobs(reqs, logits, rows)
        live_reqs = [r for r in reqs if r.max_new_tokens != 0]
        next_ids: list[int] = []
        failed: dict[int, str] = {}  # the engine's fault or bad logits: a 500, KV discarded
        rejected: dict[int, str] = {}  # a client's logit processor raised: a 400
        if live_reqs:
            # One row gather, and only when some rows are not sampled (chunks, scoring).
            picked = logits if live == list(range(logits.shape[0])) else logits[live]
            sampled, errors = sample_each(picked, live_reqs, self.vocab_size, self.eos_ids)
            next_ids = sampled.next_token_ids.tolist()
            rejected = sampled.failed_rows or {}
            failed = {i: why for i, why in self._sampling_failures(next_ids, errors).items()
                      if i not in rejected}
            if sampled.next_token_logprobs is not None:
                good = [i for i in range(len(live_reqs)) if i not in failed and i not in rejected]
                collect_output_logprobs([live_reqs[i] for i in good], sampled, good)
        for i, message in rejected.items():
            live_reqs[i].finish_abort(message, status_code=400)
        for i, why in failed.items():
            logger.error("Sampling failed for request %s: %s", live_reqs[i].rid, why)
            live_reqs[i].finish_abort(f"Sampling failed for this request: {why}", status_code=500)
        dropped = [live_reqs[i] for i in failed]
        ok = [(r, t) for i, (r, t) in enumerate(zip(live_reqs, next_ids))
              if i not in failed and i not in rejected]
        for r, tok in ok:
            r.output_ids.append(tok)
            r.check_finished(self.eos_ids, self.context_len)
        advance_grammars([r for r, _ in ok], [t for _, t in ok])
        for r, _ in ok:
            r.check_stop_strings()
        keep = [r for r in reqs if not r.finished]
        self.emit(keep)
        gone = {id(r) for r in dropped}
        self.finish([r for r in reqs if r.finished and id(r) not in gone])
        self.drop(dropped)
        return keep

    def _sampling_failures(self, next_ids: list[int], errors: dict[int, str]) -> dict[int, str]:
        """{row: why} for rows whose sampling raised, whose logits were unusable, or whose id is
        outside the vocabulary (appending it would make the next forward raise for everyone)."""
        failed = dict(errors)
        for i, tok in enumerate(next_ids):
            if i in failed:
                continue
            if tok == INVALID_TOKEN:
                failed[i] = ("its logits are not finite (NaN, or every token masked) after "
                             "bias, penalties and grammar masks.")
            elif not 0 <= tok < self.vocab_size:
                failed[i] = (f"the sampled token id {tok} is outside the vocabulary "
                             f"(size {self.vocab_size}).")
        return failed

    def emit(self, reqs: list[Req]) -> None:
        """Send what each request has not sent yet, when it is due."""
        ready = [r for r in reqs if r.finished or (r.stream and (
            r.num_sent == 0 or len(r.output_ids) - r.num_sent >= self.stream_interval))]
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

    def refuse(self, req: Req, message: str, status_code: int = 400) -> None:
        """Answer a request the engine will not run (never tracked, holds nothing) with an error
        (400: its own fault; 503: the queue is full)."""
        req.finish_abort(message, status_code=status_code)
        self.emit([req])

    def finish(self, reqs: list[Req]) -> None:
        """Release finished requests' memory, forget them, and send their last output."""
        self._release(reqs)
        self.emit(reqs)

    def finish_embeddings(self, reqs: list[Req], vectors: list[list[float]]) -> None:
        """Release requests whose embedding (or scores) is done and send the rows."""
        self._release(reqs)
        msg = BatchEmbeddingOut([], [], [], [])
        for r, vec in zip(reqs, vectors):
            msg.rids.append(r.rid)
            msg.embeddings.append(vec)
            msg.prompt_tokens.append(len(r.origin_input_ids))
            msg.cached_tokens.append(r.cached_tokens or 0)
        self.send(msg)

    def fail(self, reqs: list[Req], message: str, status_code: int) -> None:
        """Abort requests whose KV memory is already gone (the pool was reset): forget and tell."""
        for r in reqs:
            r.finish_abort(message, status_code=status_code)
            r.req_pool_idx, r.kv_len, r.fill_ids = None, 0, []
            self._live.pop(r.rid, None)
        self.emit(reqs)

    def drop(self, reqs: list[Req]) -> None:
        """Finish requests that failed on their own: free their memory without caching what they
        computed (a NaN row may mean their K/V are garbage), forget them, send their last output."""
        for r in reqs:
            self.mem.discard(r)
            self._live.pop(r.rid, None)
        self.emit(reqs)

    def _release(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.mem.release(r)
            self._live.pop(r.rid, None)
