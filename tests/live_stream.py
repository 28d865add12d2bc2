"""Helpers for tests that watch a live server's stream from a thread while they act on it."""

from __future__ import annotations

import threading
import time
from typing import Callable

import httpx
import orjson


def stream_greedy(server, prompt: str, n: int, on_chunk: Callable[[dict], None],
                  timeout: float = 300) -> threading.Thread:
    """Stream `n` greedy tokens of `prompt` (ignore_eos) in a thread, calling `on_chunk` with
    each SSE output as it arrives; returns the started thread."""

    def run():
        body = {"text": prompt, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    on_chunk(orjson.loads(line[len("data: "):]))

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
