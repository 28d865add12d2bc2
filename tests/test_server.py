"""Native endpoints of a live `nl serve` (fake paging runner, byte-level tokenizer): shapes, exact
texts and status codes, greedy outputs against the runner's unpaged oracle, streaming, prefix reuse,
bad input, aborts and dropped clients."""

import asyncio
import dataclasses
import json
import time

import httpx
import pytest
from transformers import AutoTokenizer

from nlcli.engine.args import ServerArgs
from nlcli.engine.api.http_server import FLUSH_TEXT
from tests.test_scheduler_fakes import EOS_ID, LiveServer, reference_greedy

pytestmark = pytest.mark.slow  # one server start per module (~20 s on 2 cores)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("srv")), ["--context-length", "512"],
                     env={"NL_FAKE_STEP_DELAY": "0.005"})
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def tok(server):
    return AutoTokenizer.from_pretrained(server.model_path)


def _expected(tok, prompt: str, n: int, ignore_eos=False) -> tuple[str, list[int]]:
    ids = reference_greedy(tok.encode(prompt), n, ignore_eos)
    return tok.decode(ids, skip_special_tokens=True), ids


def gen(server, body, **kw):
    return httpx.post(server.url + "/generate", json=body, timeout=120, **kw)


def test_info_endpoints(server):
    info = httpx.get(server.url + "/get_model_info").json()
    assert info == {"model_path": server.model_path, "is_generation": True}
    args = httpx.get(server.url + "/get_server_args").json()
    assert set(args) == {f.name for f in dataclasses.fields(ServerArgs)} and args["port"] == server.port
    sinfo = httpx.get(server.url + "/get_server_info").json()
    assert sinfo["max_total_num_tokens"] == 4096 and isinstance(sinfo["version"], str)
    # internal_states are live gauges (a heartbeat may land between the two calls).
    same = httpx.get(server.url + "/server_info").json()
    assert [s["dp_rank"] for s in same.pop("internal_states")] == [0]
    assert same == {k: v for k, v in sinfo.items() if k != "internal_states"}
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/get_memory_pool_size")
        assert r.status_code == 200 and r.text == "4096"
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.content == b""
    r = httpx.get(server.url + "/health_generate", timeout=30)
    assert r.status_code == 200 and r.content == b""


def test_generate_single_matches_reference(server, tok):
    prompt = "The capital of France is"
    r = gen(server, {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
    assert r.status_code == 200
    body = r.json()
    text, ids = _expected(tok, prompt, 16)
    assert body["text"] == text
    meta = body["meta_info"]
    assert list(meta) == ["id", "finish_reason", "prompt_tokens", "completion_tokens",
                          "cached_tokens", "e2e_latency"]
    assert meta["prompt_tokens"] == len(tok.encode(prompt))
    assert meta["completion_tokens"] == len(ids)
    if ids[-1] == EOS_ID:
        assert meta["finish_reason"] == {"type": "stop", "matched": EOS_ID}
    else:
        assert meta["finish_reason"] == {"type": "length", "length": 16}


def test_input_ids_rid_and_put(server, tok):
    ids = tok.encode("abc def")
    r = httpx.put(server.url + "/generate", json={"input_ids": ids, "rid": "my-rid",
                                                  "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    assert r.status_code == 200
    assert r.json()["meta_info"]["id"] == "my-rid"
    assert r.json()["text"] == tok.decode(reference_greedy(ids, 4), skip_special_tokens=True)


def test_repeat_prompt_reports_cached_tokens(server, tok):
    body = {"text": "a fairly unique prompt about radix trees 12345",
            "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    first, second = gen(server, body).json(), gen(server, body).json()
    p = first["meta_info"]["prompt_tokens"]
    assert second["meta_info"]["cached_tokens"] == p - 1 and second["text"] == first["text"]


def test_batch_and_n_give_arrays(server, tok):
    prompts = ["one", "two two", "three three three"]
    r = gen(server, {"text": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 6}})
    out = r.json()
    assert isinstance(out, list) and [o["text"] for o in out] == [_expected(tok, p, 6)[0] for p in prompts]
    single = gen(server, {"text": ["solo"], "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
    assert isinstance(single.json(), list) and len(single.json()) == 1
    n2 = gen(server, {"text": "twins", "sampling_params": {"temperature": 0, "max_new_tokens": 5, "n": 2}})
    assert [o["text"] for o in n2.json()] == [_expected(tok, "twins", 5)[0]] * 2
    per = gen(server, {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}, {"max_new_tokens": 2}]})
    assert [o["meta_info"]["completion_tokens"] for o in per.json()] == [1, 2]


def test_32_concurrent_equal_each_alone(server, tok):
    prompts = [f"request number {i} says " + "x" * (i % 7) for i in range(32)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*[client.post(server.url + "/generate", json={
                "text": p, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}})
                for p in prompts])
        return [r.json()["text"] for r in rs]

    together = asyncio.run(run())
    alone = [gen(server, {"text": p, "sampling_params": {"temperature": 0, "max_new_tokens": 24,
                                                         "ignore_eos": True}}).json()["text"]
             for p in prompts[:4]]
    assert together[:4] == alone
    assert together == [_expected(tok, p, 24, ignore_eos=True)[0] for p in prompts]


def _events(resp) -> list:
    events = []
    for line in resp.iter_lines():
        if line:
            assert line.startswith("data: ")
            events.append(line[6:])
    return events


def test_streaming_events(server, tok):
    body = {"text": "stream me", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    texts = [o["text"] for o in objs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, only grows
    assert all("\ufffd" not in t for t in texts)  # never half a UTF-8 character
    assert all(o["meta_info"]["finish_reason"] is None for o in objs[:-1])
    assert objs[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 40}
    assert texts[-1] == _expected(tok, "stream me", 40, ignore_eos=True)[0]
    assert len(objs) > 10


def test_streaming_batch_has_index(server):
    body = {"text": ["left", "right"], "stream": True, "sampling_params": {"max_new_tokens": 5}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        objs = [json.loads(e) for e in _events(r)[:-1]]
    assert {o["index"] for o in objs} == {0, 1}
    assert sum(o["meta_info"]["finish_reason"] is not None for o in objs) == 2


@pytest.mark.parametrize("body, field", [
    ({"text": 5}, "text"),
    ({"text": ""}, "text"),
    ({}, "text"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, "a"]}, "input_ids"),
    ({"input_ids": [999999]}, "input_ids"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"text": "hi", "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"text": "hi", "sampling_params": 3}, "sampling_params"),
    ({"text": ["a", "b"], "rid": "x"}, "rid"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "rid"),
    ({"text": "hi", "stream": "yes"}, "stream"),
    ({"text": "y" * 600}, "context length"),
])
def test_bad_input_is_400_naming_the_field(server, body, field):
    r = gen(server, body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_malformed_json_and_long_prompt_messages(server):
    r = httpx.post(server.url + "/generate", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = gen(server, {"input_ids": [65] * 600})
    assert r.json()["error"]["message"] == (
        "The input (600 tokens) is longer than the model's context length (512 tokens).")
    assert gen(server, {"text": "still serving", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_flush_cache_text_and_reset(server):
    body = {"text": "flush me please, flush me", "sampling_params": {"temperature": 0, "max_new_tokens": 2}}
    gen(server, body)
    r = httpx.post(server.url + "/flush_cache")
    assert r.status_code == 200 and r.text == FLUSH_TEXT
    assert gen(server, body).json()["meta_info"]["cached_tokens"] == 0
    assert "Cache flushed successfully!" in server.log()


def test_abort_request_by_rid(server):
    body = {"text": "long one", "rid": "to-abort", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        assert httpx.post(server.url + "/abort_request", json={"rid": "to-abort"}).status_code == 200
        objs = [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    assert objs[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert objs[-1]["meta_info"]["completion_tokens"] < 400


def test_dropped_streams_free_memory_and_server_stays_fast(server):
    body = {"text": "drop me", "stream": True, "sampling_params": {"max_new_tokens": 450, "ignore_eos": True}}

    async def drop_one(client):
        async with client.stream("POST", server.url + "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    return  # leaving the block closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*[drop_one(client) for _ in range(16)])

    aborted_before = server.log().count("Abort running request")
    asyncio.run(run())
    start = time.monotonic()
    r = gen(server, {"text": "after the storm", "sampling_params": {"max_new_tokens": 8}})
    assert r.status_code == 200 and time.monotonic() - start < 3.0
    # The engine checks its books when idle; strict mode would have killed it on a leak.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.log().count("Abort running request") < aborted_before + 16:
        time.sleep(0.2)
    assert server.log().count("Abort running request") == aborted_before + 16
    time.sleep(1.5)
    assert httpx.get(server.url + "/health").status_code == 200
    assert "leak" not in server.log()


def test_client_disconnect_non_streaming(server):
    body = {"text": "impatient", "sampling_params": {"max_new_tokens": 450, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=0.3)
    start = time.monotonic()
    assert gen(server, {"text": "next", "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    assert time.monotonic() - start < 2.0
    assert "Client disconnected" in server.log()
