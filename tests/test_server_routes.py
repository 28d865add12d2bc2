"""Routes SGLang clients call, on a live `nl serve` (fake paging runner, byte-level tokenizer):
/tokenize and /detokenize against the tokenizer itself, /pause_generation and
/continue_generation around a stream (output equal to an unpaused greedy run), abort_all_requests
on the weight-update routes, and unknown routes / wrong methods in nl's envelopes."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.live_stream import stream_greedy, wait_for
from tests.test_scheduler_fakes import LiveServer, reference_greedy

pytestmark = pytest.mark.slow  # one server start per module

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("routes"))
    template = os.path.join(tmp, "template.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    srv = LiveServer(tmp, ["--context-length", "512", "--chat-template", template],
                     env={"NL_FAKE_STEP_DELAY": "0.02"})
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def tok(server):
    return AutoTokenizer.from_pretrained(server.model_path)


def post(server, path, body, timeout=60):
    return httpx.post(server.url + path, json=body, timeout=timeout)


# ---- /tokenize, /detokenize ------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_single_batch_and_special_tokens(server, tok, prefix):
    text = "Hello, wörld! </s>"
    for special in (True, False):
        r = post(server, prefix + "/tokenize", {"prompt": text, "add_special_tokens": special})
        assert r.status_code == 200, r.text
        want = tok.encode(text, add_special_tokens=special)
        assert r.json() == {"tokens": want, "count": len(want), "max_model_len": 512}
    texts = ["a", "bcd", "数"]
    r = post(server, prefix + "/tokenize", {"prompt": texts})
    want = [tok.encode(t) for t in texts]
    assert r.json() == {"tokens": want, "count": [len(w) for w in want], "max_model_len": 512}


def test_tokenize_messages_as_chat(server, tok):
    msgs = [{"role": "user", "content": "Hi there"}]
    r = post(server, "/tokenize", {"messages": msgs})
    want = tok.apply_chat_template(msgs, chat_template=TEMPLATE, add_generation_prompt=True,
                                   tokenize=False)
    assert r.json()["tokens"] == tok.encode(want, add_special_tokens=False)


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_detokenize(server, tok, prefix):
    ids = tok.encode("Hello, wörld!") + [tok.eos_token_id]
    r = post(server, prefix + "/detokenize", {"tokens": ids})
    assert r.json() == {"text": tok.decode(ids, skip_special_tokens=True)}
    r = post(server, prefix + "/detokenize", {"tokens": ids, "skip_special_tokens": False})
    assert r.json() == {"text": tok.decode(ids)}
    r = post(server, prefix + "/detokenize", {"tokens": [ids, [72], []]})
    assert r.json() == {"text": [tok.decode(ids, skip_special_tokens=True), "H", ""]}
    assert post(server, prefix + "/detokenize", {"tokens": []}).json() == {"text": ""}


@pytest.mark.parametrize("path,body,param,needle", [
    ("/tokenize", {}, None, "Exactly one of 'prompt' or 'messages'"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None,
     "Exactly one of"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "maybe"}, "add_special_tokens",
     "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus", "bogus"),
    ("/detokenize", {}, "tokens", "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens", "Invalid tokens type"),
    ("/detokenize", {"tokens": [1, "x"]}, "tokens", "'tokens' must be a list of integers"),
    ("/detokenize", {"tokens": [[1], [2, "x"]]}, "tokens", "Sublist in 'tokens'"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens", "99999"),
])
def test_tokenize_errors_are_400_naming_the_field(server, path, body, param, needle):
    for prefix in ("", "/v1"):
        r = post(server, prefix + path, body)
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["object"] == "error" and err["code"] == 400 and needle in err["message"]
        if param is not None:
            assert err["param"] == param or param in err["message"]


def test_tokenize_big_input_keeps_the_loop_free(server, tok):
    text = "lorem ipsum dolor sit amet " * 80_000  # 2.2 MB: seconds of tokenizer work
    result = {}

    def big():
        result["r"] = post(server, "/tokenize", {"prompt": text}, timeout=120)

    t = threading.Thread(target=big)
    t.start()
    health_times = []
    while t.is_alive():
        t0 = time.monotonic()
        httpx.get(server.url + "/health", timeout=30)
        health_times.append(time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    r = result["r"]
    assert r.status_code == 200 and r.json()["count"] == len(text)  # one byte per token
    assert len(health_times) >= 3 and min(health_times) < 0.5, health_times
    over = post(server, "/tokenize", {"prompt": "x" * (9 << 20)})
    assert over.status_code == 413 and "larger than" in over.json()["error"]["message"]


# ---- /pause_generation, /continue_generation -------------------------------------------------
def _stream(server, prompt: str, n: int, events: list) -> threading.Thread:
    """Stream a greedy generation in a thread; `events` gets (arrival time, output) per chunk."""
    return stream_greedy(server, prompt, n, lambda out: events.append((time.monotonic(), out)),
                         timeout=120)


def _pause(server, **body):
    r = post(server, "/pause_generation", body)
    assert (r.status_code, r.json()) == (200, {"message": "Generation paused successfully.",
                                               "status": "ok"})


def _continue(server):
    r = post(server, "/continue_generation", {})
    assert (r.status_code, r.json()) == (200, {"message": "Generation continued successfully.",
                                               "status": "ok"})


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_keeps_requests_and_output_matches_unpaused(server, tok, mode):
    prompt, n = f"Paused {mode} stream:", 80
    want = tok.decode(reference_greedy(tok.encode(prompt), n, ignore_eos=True),
                      skip_special_tokens=True)
    events: list = []
    t = _stream(server, prompt, n, events)
    wait_for(lambda: len(events) >= 5)
    _pause(server, mode=mode)
    try:
        # Chunks the engine sent before it answered may still be on their way to this client's
        # stream thread (a race of threads, not of the engine); after that, nothing may come.
        time.sleep(0.3)
        held = len(events)
        # A request sent while paused queues; it runs after continue.
        late: dict = {}
        late_t = threading.Thread(target=lambda: late.update(r=post(server, "/generate", {
            "text": "late", "sampling_params": {"temperature": 0, "max_new_tokens": 4}})))
        late_t.start()
        time.sleep(1.0)  # 50 engine steps of the fake runner: a pause that leaks shows here
        assert len(events) == held, "tokens were generated while paused"
        assert t.is_alive() and late_t.is_alive() and not late
    finally:
        _continue(server)  # a failure here must not leave the module's server paused
    t.join(60)
    late_t.join(60)
    final = events[-1][1]
    assert final["text"] == want
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": n}
    assert late["r"].status_code == 200
    assert len(events) > held


def test_pause_abort_mode_ends_requests(server):
    events: list = []
    t = _stream(server, "Aborted by a pause", 400, events)
    wait_for(lambda: len(events) >= 3)
    _pause(server)  # mode defaults to abort
    try:
        t.join(30)
        assert not t.is_alive()
        assert events[-1][1]["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        _continue(server)
    r = post(server, "/generate", {"text": "after", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3


def test_pause_bad_mode_is_400(server):
    r = post(server, "/pause_generation", {"mode": "sideways"})
    assert r.status_code == 400 and "mode" in r.json()["error"]["message"]
    r = post(server, "/continue_generation", {"torch_empty_cache": "x"})
    assert r.status_code == 400 and "torch_empty_cache" in r.json()["error"]["message"]


# ---- unknown routes, wrong methods ----------------------------------------------------------
def test_unknown_route_and_method_use_nl_envelopes(server):
    r = httpx.get(server.url + "/no_such_route")
    assert r.status_code == 404 and set(r.json()) == {"error"} and "/no_such_route" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/no_such_route", json={})
    body = r.json()
    assert r.status_code == 404 and body["object"] == "error" and body["code"] == 404
    assert "detail" not in body
    r = httpx.get(server.url + "/generate")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["code"] == 405
