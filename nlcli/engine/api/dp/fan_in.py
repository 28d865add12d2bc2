"""Merging what several engine groups answer into the one answer the API process expects.

A control message (flush, weight update, pause) goes to every group; each group answers once.
ReplyGather keeps the answers until every group has, then hands on one merged answer: a success
only when every group succeeded, with the first failing group's message. Heartbeats are merged
into one set of gauges for /metrics: counts add up, shares are averaged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from nlcli.engine.io_struct import (FlushCacheReq, FlushCacheReqOutput, GenerationControlOutput,
                                    GenerationControlReq, Heartbeat, UpdateWeightReq,
                                    UpdateWeightReqOutput)

# Gauges that are a share (0-1) per group: averaged; the other gauges are added up.
_SHARES = ("token_usage", "cache_hit_rate")


def merge_heartbeats(beats: list[Heartbeat]) -> Heartbeat:
    out = {}
    for f in dataclasses.fields(Heartbeat):
        values = [getattr(b, f.name) for b in beats]
        out[f.name] = sum(values) / len(values) if f.name in _SHARES else sum(values)
    return Heartbeat(**out)


def _merge(replies: list) -> object:
    first = replies[0]
    if isinstance(first, FlushCacheReqOutput):
        return FlushCacheReqOutput(success=all(r.success for r in replies))
    if isinstance(first, UpdateWeightReqOutput):
        failed = [(g, r) for g, r in enumerate(replies) if not r.success]
        if not failed:
            return first
        g, bad = failed[0]
        prefix = f"DP group {g}: " if len(replies) > 1 else ""
        return dataclasses.replace(bad, message=prefix + bad.message)
    if isinstance(first, GenerationControlOutput):
        return GenerationControlOutput(paused=all(r.paused for r in replies),
                                       num_paused_requests=sum(r.num_paused_requests
                                                               for r in replies))
    return first


class ReplyGather:
    """Collects one reply per group for each control message type."""

    KINDS = (FlushCacheReqOutput, UpdateWeightReqOutput, GenerationControlOutput)
    _REPLY = {FlushCacheReq: FlushCacheReqOutput, UpdateWeightReq: UpdateWeightReqOutput,
              GenerationControlReq: GenerationControlOutput}

    def __init__(self, n: int):
        self.n = n
        self._got: dict[type, dict[int, object]] = {}

    def expect(self, request: object) -> None:
        """`request` goes out to every group now: forget answers left from an earlier one that
        timed out, so they are not merged with the new ones."""
        kind = self._REPLY.get(type(request))
        if kind is not None:
            self._got.pop(kind, None)

    def add(self, group: int, msg: object) -> Optional[object]:
        """The merged reply once every group answered `msg`'s kind, else None."""
        got = self._got.setdefault(type(msg), {})
        got[group] = msg
        if len(got) < self.n:
            return None
        del self._got[type(msg)]
        return _merge([got[g] for g in range(self.n)])
