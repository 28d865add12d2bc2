"""OutputProcessor: the engine's table of live requests and everything that leaves for the API.

After a forward it appends each request's sampled token and runs the finish checks in order
(length and EOS, then the grammar, then stop strings), gathers output logprobs, and emits
`BatchTokenIDOut` deltas (every `stream_interval` tokens for streams, once at the end otherwise).
Finishing a request releases its KV memory and forgets it. Embedding rows leave as
`BatchEmbeddingOut` through the same object.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nlcli.engine.io_struct import BatchEmbeddingOut, BatchTokenIDOut
from nlcli.engine.scheduler.batch import sample_next_ids
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.grammar_queue import advance_grammars
from nlcli.engine.scheduler.logprobs import (collect_output_logprobs, collect_scoring_logprobs,
                                             logprob_delta)
from nlcli.engine.scheduler.req import Req


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
        if live_reqs:
            # One row gather, and only when some rows are not sampled (chunks, scoring).
            picked = logits if live == list(range(logits.shape[0])) else logits[live]
            sampled = sample_next_ids(picked, live_reqs, self.vocab_size, self.eos_ids)
            next_ids = sampled.next_token_ids.tolist()
            if sampled.next_token_logprobs is not None:
                collect_output_logprobs(live_reqs, sampled)
            if sampled.failed_rows:  # a client's logit processor raised: end only its requests
                for i, message in sampled.failed_rows.items():
                    live_reqs[i].finish_abort(message, status_code=400)
                kept = [i for i in range(len(live_reqs)) if i not in sampled.failed_rows]
                live_reqs, next_ids = [live_reqs[i] for i in kept], [next_ids[i] for i in kept]
        for r, tok in zip(live_reqs, next_ids):
            r.output_ids.append(tok)
            r.check_finished(self.eos_ids, self.context_len)
        advance_grammars(live_reqs, next_ids)
        for r in live_reqs:
            r.check_stop_strings()
        keep = [r for r in reqs if not r.finished]
        self.emit(keep)
        self.finish([r for r in reqs if r.finished])
        return keep

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

    def _release(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.mem.release(r)
            self._live.pop(r.rid, None)
