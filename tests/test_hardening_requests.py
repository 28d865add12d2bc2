"""One request must never hurt the others (issue 13): `n` and the work of one request bounded
before anything is expanded, submissions all-or-nothing, free-form fields bounded, unexpected
errors in the JSON envelope, waits with timeouts, a wedged engine reported by /health, big inputs
rejected without stalling the event loop, and the smaller holes (chunked bodies over the cap,
strict /v1 types). Runs the real app on the fake engine, in this process (tests/app_server.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from nlcli.engine.api.native_input import gen_items, parse_generate
from nlcli.engine.limits import MAX_GENERATIONS_PER_REQUEST
from nlcli.engine.sampling.params import MAX_N
from tests.app_server import AppServer


@pytest.fixture(scope="module")
def srv():
    with AppServer(step_delay=0.001) as s:
        yield s


def post(srv, path, body, timeout=30.0, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=timeout, **kw)


def greedy_body(text="Hello", n=1, **sp):
    return {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "n": n, **sp}}


# ---- 1. n and the work of one request ---------------------------------------------------------
BAD_NS = [10**9, 3000, MAX_N + 1, 1e9, {}, [], "2", None, 0, -1, True]


@pytest.mark.parametrize("n", BAD_NS, ids=repr)
def test_parse_generate_bounds_n_before_expanding(n):
    body = {"text": "a", "sampling_params": {"n": n}}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="n"):
        parse_generate(body)
    # Per-prompt sampling_params: a non-hashable n must be a 400 too, not a TypeError.
    with pytest.raises(ValueError, match="n"):
        parse_generate({"text": ["a", "b"], "sampling_params": [{"n": n}, {"n": 1}]})
    with pytest.raises(ValueError, match="n"):
        gen_items(["a"], {"n": n}, ["r"])
    assert time.perf_counter() - t0 < 0.5


def test_work_per_request_is_capped():
    per = MAX_N
    prompts = MAX_GENERATIONS_PER_REQUEST // per + 1
    with pytest.raises(ValueError, match="n") as e:
        parse_generate({"text": ["p"] * prompts, "sampling_params": {"n": per}})
    assert str(MAX_GENERATIONS_PER_REQUEST) in str(e.value)
    with pytest.raises(ValueError, match=str(MAX_GENERATIONS_PER_REQUEST)):
        parse_generate({"input_ids": [[1]] * (MAX_GENERATIONS_PER_REQUEST + 1)})
    with pytest.raises(ValueError, match=str(MAX_GENERATIONS_PER_REQUEST)):
        gen_items(["p"] * prompts, {"n": per}, [f"r{i}" for i in range(prompts)])
    # At the cap exactly it is accepted.
    items, _, _ = parse_generate({"text": ["p"] * (MAX_GENERATIONS_PER_REQUEST // per),
                                  "sampling_params": {"n": per}})
    assert len(items) == MAX_GENERATIONS_PER_REQUEST


@pytest.mark.parametrize("n", [10**9, 3000, MAX_N + 1, 1e9, {}, [], 0], ids=repr)
def test_every_route_answers_bad_n_with_400_quickly(srv, n):
    t0 = time.perf_counter()
    cases = [
        ("/generate", {"text": "a", "sampling_params": {"n": n}}),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{"n": n}, {"n": 1}]}),
        ("/v1/completions", {"model": "m", "prompt": "a", "n": n}),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"], "n": n}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a"}],
                                  "n": n}),
    ]
    for path, body in cases:
        r = post(srv, path, body, timeout=10)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        err = r.json()
        message = err["error"]["message"] if "error" in err else err["message"]
        assert "n" in message
    assert time.perf_counter() - t0 < 5.0


def test_too_much_work_is_400_on_every_route(srv):
    many = MAX_GENERATIONS_PER_REQUEST // MAX_N + 1
    for path, body in [
        ("/generate", {"text": ["a"] * many, "sampling_params": {"n": MAX_N}}),
        ("/v1/completions", {"model": "m", "prompt": ["a"] * many, "n": MAX_N}),
    ]:
        r = post(srv, path, body)
        assert r.status_code == 400, r.text
        assert str(MAX_GENERATIONS_PER_REQUEST) in r.text
    # The server still serves normal requests.
    assert post(srv, "/generate", greedy_body()).status_code == 200
