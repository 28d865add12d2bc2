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
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.created = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.sent_at: Optional[float] = None  # monotonic time the engine was sent it (None: held)

    def finish(self, out: dict) -> None:
        """Hand the final output to the waiter."""
        self.finished = True
        self.queue.put_nowait(out)

    def fail(self, error: Exception) -> None:
        self.queue.put_nowait(error)

    def apply(self, msg: BatchTokenIDOut, i: int, now: float) -> dict:
        """The cumulative output after entry `i` of an engine delta (`now`: perf_counter)."""
        finish = msg.finished_reasons[i]
        text = self.add_tokens(msg.new_token_ids[i], finish)
        if self.first_token_time is None and msg.completion_tokens[i]:
            self.first_token_time = now
        meta = {"id": self.rid, "finish_reason": finish, "prompt_tokens": msg.prompt_tokens[i]}
        if self.logprobs is not None:
            self.logprobs.add(msg.logprobs[i] if i < len(msg.logprobs) else None,
                              msg.new_token_ids[i])
            meta.update(self.logprobs.meta())
        meta.update(completion_tokens=msg.completion_tokens[i],
                    cached_tokens=msg.cached_tokens[i], e2e_latency=now - self.created)
        return {"text": text, "meta_info": meta}

    def add_tokens(self, ids: list[int], finish: Optional[dict]) -> str:
        """Detokenize a delta; the text to show: cut at the engine's stop string once finished,
        else held back at a possible stop-string start."""
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
