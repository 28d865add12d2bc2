"""One in-flight request as the API process sees it: its detokenizer, its output queue, timing.

The TokenizerManager keeps a `ReqState` per rid it sent to the engine (generations and, through
`submit_tokenized`, embeddings), so aborts, engine death and a weight update's drain see them all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from nlcli.engine.api.logprobs import LogprobAccumulator
from nlcli.engine.detokenizer import IncrementalDetokenizer
from nlcli.engine.io_struct import BatchTokenIDOut


class EngineDeadError(RuntimeError):
    pass


class ReqState:
    """`detok` is None for requests with no text (embeddings)."""

    def __init__(self, rid: str, prompt_len: int, detok: Optional[IncrementalDetokenizer],
                 stream: bool, logprobs: Optional[LogprobAccumulator] = None):
        self.rid = rid
        self.prompt_len = prompt_len
        self.detok = detok
        self.stream = stream
        self.logprobs = logprobs
        self.output_ids: list[int] = []  # every generated id so far (SGLang's `output_ids`)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.created = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        # Set by shutdown.abort_in_flight: the finish_reason the engine's abort is reported with,
        # so the route answers it with that status (a 503) rather than a 200.
        self.abort_reason: Optional[dict] = None
        self.sent_at: Optional[float] = None  # monotonic time the engine was sent it (None: held)
        self.group = 0  # the engine group (--dp-size) it was routed to

    def mark_tokens(self, now: float, n: int) -> Optional[float]:
        """Note that `n` tokens arrived at `now`; the gap since the previous ones (None for the
        first, or when none arrived): what inter-token latency measures."""
        if n <= 0:
            return None
        gap = None if self.last_token_time is None else now - self.last_token_time
        self.last_token_time = now
        if self.first_token_time is None:
            self.first_token_time = now
        return gap

    def finish(self, out: dict) -> None:
        """Hand the final output to the waiter."""
        self.finished = True
        self.queue.put_nowait(out)

    def fail(self, error: Exception) -> None:
        self.queue.put_nowait(error)

    def apply(self, msg: BatchTokenIDOut, i: int, now: float) -> tuple[dict, Optional[float]]:
        """The cumulative output after entry `i` of an engine delta (`now`: perf_counter), and
        the inter-token gap it makes (mark_tokens)."""
        finish = self.reported_finish(msg.finished_reasons[i])
        text = self.add_tokens(msg.new_token_ids[i], finish)
        gap = self.mark_tokens(now, len(msg.new_token_ids[i]))
        meta = {"id": self.rid, "finish_reason": finish, "prompt_tokens": msg.prompt_tokens[i]}
        if self.logprobs is not None:
            self.logprobs.add(msg.logprobs[i] if i < len(msg.logprobs) else None,
                              msg.new_token_ids[i])
            meta.update(self.logprobs.meta())
        meta.update(completion_tokens=msg.completion_tokens[i],
                    cached_tokens=msg.cached_tokens[i], e2e_latency=now - self.created)
        return self.output(text, meta), gap

    def output(self, text: str, meta: dict) -> dict:
        """One answer in SGLang's shape: cumulative output_ids (its default, non-incremental
        streaming), and no "text" key at all without a detokenizer (--skip-tokenizer-init)."""
        out = {"output_ids": list(self.output_ids), "meta_info": meta}
        return out if self.detok is None else {"text": text, **out}

    def abort_with(self, message: str, status_code: int) -> None:
        """Report the engine's coming abort of this request as `message` with `status_code`."""
        self.abort_reason = {"type": "abort", "message": message, "status_code": status_code}

    def reported_finish(self, finish: Optional[dict]) -> Optional[dict]:
        """The engine's finish_reason as the client sees it (abort_with's, for an abort)."""
        if self.abort_reason is not None and finish is not None and finish.get("type") == "abort":
            return self.abort_reason
        return finish

    def end_now(self, error: Exception) -> None:
        """Finish with `error` without waiting for the engine (it did not answer an abort)."""
        self.finished = True
        self.queue.put_nowait(error)

    def add_tokens(self, ids: list[int], finish: Optional[dict]) -> str:
        """Detokenize a delta; the text to show: cut at the engine's stop string once finished,
        else held back at a possible stop-string start."""
        self.output_ids.extend(ids)
        if self.detok is None:
            return ""
        ids = _visible_ids(ids, finish, self.detok.no_stop_trim)
        self.detok.add(ids, final=finish is not None)
        if finish is None:
            return self.detok.visible_text()
        matched = finish.get("matched") if finish.get("type") == "stop" else None
        return self.detok.final_text(matched if isinstance(matched, str) else None)


def _visible_ids(ids: list[int], finish: Optional[dict], no_stop_trim: bool) -> list[int]:
    """The ids whose text the client sees: a matched stop token (EOS, stop_token_ids, a grammar's
    end) is cut unless no_stop_trim, as upstream trims it (it always arrives last)."""
    if (finish and finish.get("type") == "stop" and not no_stop_trim and ids
            and isinstance(finish.get("matched"), int) and not isinstance(finish["matched"], bool)):
        return ids[:-1]
    return ids
