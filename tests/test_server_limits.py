"""Deadlines and the queue cap over HTTP (the real app on the fake engine, slowed per step): a
request past --waiting-timeout / --running-timeout or beyond --max-queued-requests ends with
SGLang's 503 message, in SGLang's flat error object on /generate (with nl's native `error` key
too) and OpenAI's error envelope on /v1; a streamed one ends with the abort chunk."""

from __future__ import annotations

import threading

import httpx
import orjson
import pytest

from tests.app_server import AppServer

SLOW = {"max_new_tokens": 40, "ignore_eos": True, "temperature": 0}


def _background(url: str, body: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: httpx.post(url + "/generate", json=body, timeout=60))
    t.start()
    return t


def _wait_running(srv: AppServer, n: int = 1) -> None:
    import time

    deadline = time.monotonic() + 10
    while srv.tm is None or len(srv.tm.in_flight()) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # let the engine admit it


@pytest.fixture(scope="module")
def waiting_srv():
    with AppServer(step_delay=0.05, max_running_requests=1, waiting_timeout=0.3) as srv:
        yield srv


def test_waiting_timeout_on_generate(waiting_srv):
    t = _background(waiting_srv.url, {"text": "a", "sampling_params": SLOW})
    _wait_running(waiting_srv)
    r = httpx.post(waiting_srv.url + "/generate", timeout=30,
                   json={"text": "b", "sampling_params": {"max_new_tokens": 2}})
    t.join()
    assert r.status_code == 503
    message = "Request waiting timeout reached."
    assert r.json() == {"error": {"message": message}, "object": "error", "message": message,
                        "type": "503", "param": None, "code": 503}


def test_waiting_timeout_on_v1(waiting_srv):
    t = _background(waiting_srv.url, {"text": "a", "sampling_params": SLOW})
    _wait_running(waiting_srv)
    r = httpx.post(waiting_srv.url + "/v1/completions", timeout=30,
                   json={"model": "m", "prompt": "b", "max_tokens": 2})
    t.join()
    assert r.status_code == 503
    body = r.json()
    assert body["object"] == "error" and body["code"] == 503
    assert body["message"] == "Request waiting timeout reached."


def test_running_timeout_streams_the_abort_then_done():
    with AppServer(step_delay=0.05, running_timeout=0.3) as srv:
        r = httpx.post(srv.url + "/generate", timeout=30,
                       json={"text": "a", "sampling_params": SLOW})
        assert r.status_code == 503 and r.json()["message"] == "Request running timeout reached."
        events = []
        with httpx.stream("POST", srv.url + "/generate", timeout=30,
                          json={"text": "a", "stream": True, "sampling_params": SLOW}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        last = orjson.loads(events[-2])["meta_info"]
        assert last["finish_reason"] == {"type": "abort", "status_code": 503,
                                         "message": "Request running timeout reached."}
        assert 0 < last["completion_tokens"] < 40
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 40, "ignore_eos": True})
        assert r.status_code == 503 and r.json()["code"] == 503


def test_queue_full_is_503():
    with AppServer(step_delay=0.05, max_running_requests=1, max_queued_requests=1) as srv:
        a = _background(srv.url, {"text": "a", "sampling_params": SLOW})
        _wait_running(srv)
        b = _background(srv.url, {"text": "b", "sampling_params": SLOW})
        _wait_running(srv, 2)
        r = httpx.post(srv.url + "/generate", timeout=30,
                       json={"text": "c", "sampling_params": {"max_new_tokens": 2}})
        a.join()
        b.join()
        assert r.status_code == 503 and r.json()["message"] == "The request queue is full."
