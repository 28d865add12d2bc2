"""Issue 13's HTTP-level holes, on the real app and the fake engine in this process: a big prompt
is refused by its length without stalling /health, a chunked body over the cap is a 413, /v1
types are strict, and idle or slow connections are closed (header deadline, connection limit)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.app_server import AppServer
from tests.test_hardening_requests import greedy_body, message_of, post


@pytest.fixture(scope="module")
def srv():
    with AppServer(step_delay=0.001) as s:
        yield s


# ---- 3. big inputs never stall the event loop -------------------------------------------------
def test_big_prompt_is_400_without_stalling_health(srv):
    latencies: list[float] = []
    stop = threading.Event()

    def poll():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert client.get(srv.url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        big = "word " * (7 * 1024 * 1024 // 5)
        for path, body in [("/generate", {"text": big}),
                           ("/v1/completions", {"model": "m", "prompt": big}),
                           ("/v1/chat/completions", {"model": "m", "messages": [
                               {"role": "user", "content": big}]})]:
            r = post(srv, path, body, timeout=60)
            assert r.status_code == 400, r.text
            assert "context length" in message_of(r)
    finally:
        stop.set()
        poller.join()
    assert latencies and max(latencies) < 1.0, max(latencies)


# ---- 4. smaller holes: chunked bodies over the cap, strict /v1 types, idle connections ---------
@pytest.fixture(scope="module")
def capped():
    with AppServer(max_request_bytes=4096, timeout_request_header=1.0, limit_concurrency=4) as s:
        yield s


def test_chunked_body_over_the_cap_is_413(capped):
    def chunks():
        for _ in range(64):
            yield b'{"text": "' + b"x" * 1000 if _ == 0 else b"x" * 1000

    for path in ("/generate", "/v1/completions", "/abort_request"):
        r = httpx.post(capped.url + path, content=chunks(), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413, (path, r.status_code, r.text)
        assert "4096" in r.json()["error"]["message"]
    r = httpx.post(capped.url + "/generate", json=greedy_body(), timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "8"), ("max_tokens", 8.5), ("max_tokens", True), ("n", "2"), ("seed", "1"),
    ("temperature", "0.5"), ("stream", "true"), ("stream", 1), ("echo", 1), ("logprobs", "1"),
    ("ignore_eos", "yes"), ("stop", 5), ("stop_token_ids", ["1"]), ("min_tokens", "1"),
])
def test_v1_types_are_strict(srv, field, value):
    r = post(srv, "/v1/completions", {"model": "m", "prompt": "hi", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["param"].split(".")[0] == field
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    if field not in ("echo",):
        assert post(srv, "/v1/chat/completions", chat).status_code == 400


def test_v1_integral_floats_and_ints_for_floats_still_work(srv):
    r = post(srv, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 4.0,
                                      "temperature": 0, "top_p": 1, "n": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_idle_and_slow_header_connections_are_closed(capped):
    host, port = "127.0.0.1", capped.port
    idle = socket.create_connection((host, port))
    slow = socket.create_connection((host, port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    for s in (idle, slow):
        s.settimeout(10)
        t0 = time.perf_counter()
        assert s.recv(1024) == b""  # closed by the server
        assert time.perf_counter() - t0 < 5
        s.close()
    # A keep-alive client that starts a request and stalls is closed as well.
    ka = socket.create_connection((host, port))
    ka.settimeout(10)
    ka.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ka.recv(1024).startswith(b"HTTP/1.1 200")
    ka.sendall(b"GET /health HTTP/1.1\r\n")
    t0 = time.perf_counter()
    assert ka.recv(1024) == b""
    assert time.perf_counter() - t0 < 5
    ka.close()


def test_connection_limit_answers_503(capped):
    held = [socket.create_connection(("127.0.0.1", capped.port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert httpx.get(capped.url + "/health", timeout=10).status_code == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while httpx.get(capped.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
