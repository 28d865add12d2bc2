"""One request must never hurt the others (issue 13): `n` and the work of one request bounded
before anything is expanded, submissions all-or-nothing, free-form fields bounded, unexpected
errors in the JSON envelope, waits with timeouts, and a wedged engine reported by /health. Runs
the real app on the fake engine, in this process (tests/app_server.py); the HTTP-level holes
(big inputs, body cap, strict /v1 types, idle connections) are in test_hardening_http.py."""

from __future__ import annotations

import asyncio
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


def on_loop(srv, fn, *args):
    """Run `fn(*args)` on the app's event loop (its ZMQ sockets belong to that thread)."""
    async def run():
        return fn(*args)

    return asyncio.run_coroutine_threadsafe(run(), srv.loop).result(30)


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


# ---- 2. all-or-nothing submission, bounded fields, one error envelope, bounded waits ----------
def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def message_of(r: httpx.Response) -> str:
    body = r.json()
    return body["error"]["message"] if "error" in body else body["message"]


def test_deep_free_form_field_is_400_and_leaves_no_state(srv):
    for body in (greedy_body(custom_params=nested(600)),
                 {"text": ["a", "b"], "sampling_params": [{}, {"custom_params": nested(600)}]}):
        r = post(srv, "/generate", body)
        assert r.status_code == 400, r.text
        assert "custom_params" in message_of(r)
    r = post(srv, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": nested(100)}}})
    assert r.status_code == 400 and r.json()["object"] == "error"
    assert "response_format" in message_of(r)
    assert srv.tm.in_flight() == []
    # A modest nesting is fine.
    assert post(srv, "/generate", greedy_body(custom_params=nested(20))).status_code == 200
    # No phantom request: a weight update finishes at once (the fake engine refuses it).
    t0 = time.perf_counter()
    r = post(srv, "/update_weights", {"model_path": srv.args.model_path}, timeout=30)
    assert time.perf_counter() - t0 < 10 and "success" in r.json()


def test_big_free_form_field_is_400(srv):
    from nlcli.engine.limits import MAX_FREE_FORM_BYTES

    r = post(srv, "/generate", greedy_body(custom_params={"k": "x" * (MAX_FREE_FORM_BYTES + 1)}))
    assert r.status_code == 400 and "custom_params" in message_of(r)
    r = post(srv, "/v1/completions", {"model": "m", "prompt": "a",
                                      "regex": "a" * (MAX_FREE_FORM_BYTES + 1)})
    assert r.status_code == 400 and "regex" in message_of(r)


def test_submission_rolls_back_when_sending_fails(srv, monkeypatch):
    from nlcli.engine.api.native_input import GenItem
    from nlcli.engine.api.prepare import prepare_generate

    tm = srv.tm
    items = [GenItem("ab", None, {"max_new_tokens": 4}, f"rb-{i}") for i in range(3)]
    prepared = [prepare_generate(it, False, tm.tokenizer, tm.ready, tm.context_len, tm.pool_size)
                for it in items]
    sent, aborted = [], []
    real_send = tm.link.send_or_hold

    def flaky(rid, frame):
        if len(sent) == 2:
            raise RuntimeError("link broke")
        sent.append(rid)
        return real_send(rid, frame)

    monkeypatch.setattr(tm.link, "send_or_hold", flaky)
    real_abort = tm.link.send_to  # an abort goes to the request's engine group only
    monkeypatch.setattr(tm.link, "send_to",
                        lambda group, frame: (aborted.append(frame), real_abort(group, frame)))
    with pytest.raises(RuntimeError):
        on_loop(srv, tm.submit_tokenized, prepared)
    monkeypatch.undo()
    assert sent == ["rb-0", "rb-1"] and len(aborted) == 2  # what reached the engine is aborted
    assert all(tm.pending(it.rid) is None for it in items) and tm.in_flight() == []
    # A message that cannot be pickled registers nothing at all.
    prepared = [prepare_generate(it, False, tm.tokenizer, tm.ready, tm.context_len, tm.pool_size)
                for it in items]
    prepared[2][0].sampling_params.custom_params = nested(5000)
    with pytest.raises(ValueError, match="nested"):
        on_loop(srv, tm.submit_tokenized, prepared)
    assert tm.in_flight() == []


def test_unexpected_errors_answer_in_the_envelope(srv, monkeypatch):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(srv.tm, "tokenizer", Broken())
    r = post(srv, "/generate", greedy_body())
    assert r.status_code == 500 and "tokenizer exploded" in r.json()["error"]["message"]
    r = post(srv, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["object"] == "error" and body["code"] == 500 and "tokenizer exploded" in body["message"]
    monkeypatch.undo()
    assert srv.tm.in_flight() == []
    assert post(srv, "/generate", greedy_body()).status_code == 200


def test_lost_request_makes_health_503_and_the_update_drain_gives_up(srv, monkeypatch):
    from nlcli.engine.api import engine_health
    from nlcli.engine.api.native_input import GenItem
    from nlcli.engine.api.prepare import prepare_generate

    tm = srv.tm
    monkeypatch.setattr(engine_health, "WEDGE_AFTER", 1.0)
    monkeypatch.setattr(engine_health, "HEARTBEAT_MARGIN", 0.2)
    # The engine never gets this one (lost in transit), though the API process sent it.
    monkeypatch.setattr(tm.link, "send_or_hold", lambda rid, frame: True)
    prepared = [prepare_generate(GenItem("ab", None, {"max_new_tokens": 4}, "lost"), False,
                                 tm.tokenizer, tm.ready, tm.context_len, tm.pool_size)]
    on_loop(srv, tm.submit_tokenized, prepared)
    monkeypatch.setattr(tm.link, "send_or_hold", type(tm.link).send_or_hold.__get__(tm.link))
    deadline = time.monotonic() + 15
    while httpx.get(srv.url + "/health").status_code == 200:
        assert time.monotonic() < deadline, "/health stayed 200 while generation was wedged"
        time.sleep(0.2)
    t0 = time.perf_counter()
    r = post(srv, "/update_weights", {"model_path": srv.args.model_path})
    assert r.status_code == 400 and "progress" in r.json()["message"]
    assert time.perf_counter() - t0 < 5
    on_loop(srv, tm.abort, ["lost"])
    assert httpx.get(srv.url + "/health").status_code == 200
    assert post(srv, "/generate", greedy_body()).status_code == 200


def test_is_wedged_needs_an_old_request_no_output_and_an_idle_engine():
    from nlcli.engine.api.engine_health import is_wedged
    from nlcli.engine.io_struct import Heartbeat

    idle, busy = Heartbeat(), Heartbeat(num_running_reqs=1)
    now = 1000.0
    assert is_wedged([now - 60], idle, now - 1, now - 60, now, after=30)
    assert not is_wedged([], idle, now - 1, now - 60, now, after=30)  # nothing pending
    assert not is_wedged([now - 10], idle, now - 1, now - 60, now, after=30)  # sent recently
    assert not is_wedged([now - 60], busy, now - 1, now - 60, now, after=30)  # engine has it
    assert not is_wedged([now - 60], idle, now - 1, now - 5, now, after=30)  # output flowing
    assert not is_wedged([now - 60], idle, now - 59, now - 60, now, after=30)  # beat too early


def test_update_drain_has_a_timeout(monkeypatch):
    from nlcli.engine.api import update_weights

    monkeypatch.setattr(update_weights, "DRAIN_TIMEOUT", 0.5)
    with AppServer(step_delay=0.05) as slow:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", slow.url + "/generate", json={
                    "text": "x", "stream": True,
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)
                t0 = time.perf_counter()
                r = client.post(slow.url + "/update_weights",
                                json={"model_path": slow.args.model_path})
                assert r.status_code == 400 and "still running" in r.json()["message"]
                assert time.perf_counter() - t0 < 5
            # New requests were held only during the drain: they run now.
            r = client.post(slow.url + "/generate", json=greedy_body(max_new_tokens=2))
            assert r.status_code == 200
