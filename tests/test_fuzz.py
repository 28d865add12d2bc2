"""Property-based fuzzing of a live `nl serve` (tiny random Llama, float32) over every request
route and batch form: /generate (single, batch, token ids, per-prompt sampling_params, streaming,
stop_regex, token_ids_logprob), /v1/completions, /v1/chat/completions, /v1/responses, /v1/score,
/v1/rerank, /tokenize, /detokenize, /encode, /flush_cache, /abort_request and the info routes
(/pause_generation is left out: a pause queues every later request until it is continued).

Bodies mix well-formed requests with wrong types, out-of-range numbers, huge `n`, deep nesting
and junk JSON (hypothesis, derandomized: the same examples every run). The properties: no
answer is a 5xx; `/health`, polled from a thread throughout, always answers 200 within 1 s;
a greedy request afterwards is identical to one sent before; and a weight update afterwards
(the server's own checkpoint) completes, so no fuzzed request left anything behind.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # one server start (~20 s) and ~150 requests

EXAMPLES = 150
REFERENCE = {"text": "The capital of France is",
             "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}

# ---- strategies ---------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
not_null_junk = junk.filter(lambda v: v is not None)


class Deep:
    """A JSON object nested `depth` levels, built only when sent (hypothesis prints examples)."""

    def __init__(self, depth: int):
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"

    def build(self) -> dict:
        value: dict = {}
        for _ in range(self.depth):
            value = {"a": value}
        return value


def materialize(body):
    if isinstance(body, Deep):
        return body.build()
    if isinstance(body, dict):
        return {k: materialize(v) for k, v in body.items()}
    if isinstance(body, list):
        return [materialize(v) for v in body]
    return body


def either(valid, bad=not_null_junk, p_valid=4):
    """Mostly a valid value, sometimes junk of any type."""
    return st.one_of(*([valid] * p_valid), bad)


ns = either(st.integers(1, 3), st.sampled_from([0, -1, 65, 3000, 10**9, 1e9, {}, [], "2", True]))
small_tokens = either(st.integers(0, 6), st.sampled_from([-1, 10**12, 2.5, "8", True]))
text = st.text(min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, 300), min_size=1, max_size=12)

sampling = st.fixed_dictionaries(
    {"max_new_tokens": small_tokens},
    optional={
        "temperature": either(st.floats(0, 2)), "top_p": either(st.floats(0.01, 1)),
        "top_k": either(st.integers(-1, 50)), "min_p": either(st.floats(0, 1)),
        "n": ns, "seed": either(st.integers(0, 2**63 - 1)),
        "repetition_penalty": either(st.floats(0.01, 2)),
        "frequency_penalty": either(st.floats(-2, 2)), "presence_penalty": either(st.floats(-2, 2)),
        "stop": either(st.lists(st.text(min_size=1, max_size=4), max_size=3)),
        "stop_token_ids": either(st.lists(st.integers(0, 300), max_size=3)),
        "ignore_eos": either(st.booleans()), "min_new_tokens": either(st.integers(0, 3)),
        "logit_bias": either(st.dictionaries(st.integers(0, 300).map(str), st.floats(-5, 5),
                                             max_size=3)),
        "regex": either(st.sampled_from(["[ab]+", "(yes|no)", "[", ""])),
        "json_schema": either(st.sampled_from(['{"type": "object"}', '{"type": "integer"}', "{"])),
        "custom_params": either(junk, st.just(Deep(600))),
        "no_stop_trim": either(st.booleans()), "skip_special_tokens": either(st.booleans()),
        "stop_regex": either(st.sampled_from(["\\d", "[", "x+", ""])
                             | st.lists(st.sampled_from(["a", "(b|c)", "*"]), max_size=3)),
        "bogus_param": junk,
    })

generate_bodies = st.one_of(
    st.fixed_dictionaries({"text": text, "sampling_params": sampling},
                          optional={"stream": either(st.booleans()),
                                    "return_logprob": either(st.booleans()),
                                    "top_logprobs_num": either(st.integers(0, 3)),
                                    "logprob_start_len": either(st.integers(-1, 3)),
                                    "token_ids_logprob": either(st.lists(st.integers(-1, 300),
                                                                         max_size=3)),
                                    "rid": either(st.text(min_size=1, max_size=8))}),
    st.fixed_dictionaries({"text": st.lists(text, min_size=1, max_size=4),
                           "sampling_params": sampling},
                          optional={"stream": either(st.booleans())}),
    st.fixed_dictionaries({"input_ids": either(st.lists(token_ids, min_size=1, max_size=3)
                                               | token_ids), "sampling_params": sampling}),
    st.lists(text, min_size=2, max_size=3).flatmap(lambda ps: st.fixed_dictionaries({
        "text": st.just(ps), "sampling_params": st.lists(sampling, min_size=len(ps),
                                                         max_size=len(ps))})),
    st.dictionaries(st.text(max_size=12), junk, max_size=4),
)
messages = st.lists(st.fixed_dictionaries(
    {"role": either(st.sampled_from(["user", "assistant", "system"])), "content": either(text)}),
    min_size=1, max_size=3)
v1_common = {"model": either(st.just("m")), "max_tokens": small_tokens}
v1_optional = {"n": ns, "temperature": either(st.floats(0, 2)), "stream": either(st.booleans()),
               "seed": either(st.integers(0, 2**63 - 1)), "stop": either(st.text(min_size=1,
                                                                                 max_size=3)),
               "logit_bias": junk, "top_k": either(st.integers(-1, 20)), "bogus": junk}
completion_bodies = st.fixed_dictionaries(
    {**v1_common, "prompt": either(text | st.lists(text, min_size=1, max_size=3) | token_ids)},
    optional={**v1_optional, "echo": either(st.booleans()), "logprobs": either(st.integers(0, 3))})
chat_bodies = st.fixed_dictionaries(
    {**v1_common, "messages": either(messages)},
    optional={**v1_optional, "logprobs": either(st.booleans()),
              "top_logprobs": either(st.integers(0, 3)),
              "response_format": either(st.sampled_from([{"type": "json_object"},
                                                         {"type": "text"}]))})
tokenize_bodies = st.fixed_dictionaries({}, optional={
    "prompt": either(text | st.lists(text, max_size=3)), "messages": either(messages),
    "add_special_tokens": either(st.booleans()), "bogus": junk})
detokenize_bodies = st.fixed_dictionaries(
    {"tokens": either(token_ids | st.lists(token_ids, max_size=2))},
    optional={"skip_special_tokens": either(st.booleans())})
score_bodies = st.fixed_dictionaries(
    {"query": either(text | token_ids),
     "items": either(st.lists(text, max_size=3) | st.lists(token_ids, max_size=2)),
     "label_token_ids": either(st.lists(st.integers(0, 300), min_size=1, max_size=3))},
    optional={"apply_softmax": either(st.booleans()), "temperature": either(st.floats(0.1, 2)),
              "item_first": either(st.booleans()), "bogus": junk})
responses_bodies = st.fixed_dictionaries(
    {"input": either(text | messages)},
    optional={"model": either(st.just("m")), "max_output_tokens": small_tokens,
              "temperature": either(st.floats(0, 2)), "stream": either(st.booleans()),
              "instructions": either(text), "store": either(st.booleans()),
              "previous_response_id": either(st.sampled_from(["resp_missing", "bad"]))})
rerank_bodies = st.fixed_dictionaries(
    {"query": either(text), "documents": either(st.lists(text, min_size=1, max_size=3))},
    optional={"top_n": either(st.integers(0, 3))})
requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/generate"), generate_bodies),
    st.tuples(st.just("PUT"), st.just("/generate"), generate_bodies),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion_bodies),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_bodies),
    st.tuples(st.just("POST"), st.just("/encode"), st.fixed_dictionaries({"text": either(text)})),
    st.tuples(st.just("POST"), st.sampled_from(["/tokenize", "/v1/tokenize"]), tokenize_bodies),
    st.tuples(st.just("POST"), st.just("/detokenize"), detokenize_bodies),
    st.tuples(st.just("POST"), st.just("/v1/score"), score_bodies),
    st.tuples(st.just("POST"), st.just("/v1/responses"), responses_bodies),
    st.tuples(st.just("POST"), st.just("/v1/rerank"), rerank_bodies),
    st.tuples(st.just("POST"), st.just("/flush_cache"), st.none()),
    st.tuples(st.just("POST"), st.just("/abort_request"),
              st.fixed_dictionaries({}, optional={"rid": junk, "abort_all": junk})),
    st.tuples(st.sampled_from(["GET", "POST"]), st.sampled_from(
        ["/get_model_info", "/get_server_info", "/get_memory_pool_size", "/v1/models"]), st.none()),
)


# Requests that hurt the server before issue 13, always among the examples.
NASTY = [
    ("POST", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": 2,
                                                             "custom_params": Deep(600)}}),
    ("POST", "/generate", {"text": ["a", "b"], "sampling_params": [{"n": {}}, {"n": 1}]}),
    ("POST", "/generate", {"text": "a", "sampling_params": {"n": 3000, "max_new_tokens": 1}}),
    ("POST", "/generate", {"text": "word " * 180_000, "sampling_params": {"max_new_tokens": 1}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "a", "n": 1e9, "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {
        "model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "a"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": Deep(300)}}}),
    ("POST", "/v1/responses", {"model": "m", "input": "word " * 180_000}),
    ("POST", "/tokenize", {"prompt": "word " * 180_000}),
    ("POST", "/v1/score", {"query": "a", "items": ["b"], "label_token_ids": [1],
                           "temperature": Deep(300)}),
]


# ---- the server and the health poller ---------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("fuzz")),
                     ["--dtype", "float32", "--max-total-tokens", "8192", "--context-length", "512",
                      "--max-request-bytes", str(1024 * 1024)],
                     model_path=tiny_model_dir("llama"))
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


class HealthPoller(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop_event = url, threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get(self.url + "/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as e:
                    self.failures.append(f"/health: {e!r}")
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)


def _examples(reqs):
    def wrap(f):
        for req in reversed(reqs):
            f = example(req)(f)
        return f
    return wrap


def greedy(server) -> str:
    r = httpx.post(server.url + "/generate", json=REFERENCE, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_fuzzed_requests_never_hurt_the_server(server):
    before = greedy(server)
    poller = HealthPoller(server.url)
    poller.start()
    seen: dict[int, int] = {}
    client = httpx.Client(timeout=60)

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests)
    @_examples(NASTY)
    def fuzz(req):
        method, path, body = req
        r = client.request(method, server.url + path, json=materialize(body))
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body, r.status_code, r.text[:500])

    t0 = time.perf_counter()
    try:
        fuzz()
    finally:
        poller.stop_event.set()
        poller.join()
        client.close()
    elapsed = time.perf_counter() - t0
    assert not poller.failures, poller.failures[:5]
    assert poller.latencies and max(poller.latencies) < 1.0, max(poller.latencies)
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # both kinds were exercised
    assert elapsed < 60, elapsed

    assert greedy(server) == before
    r = httpx.post(server.url + "/update_weights", json={"model_path": server.model_path},
                   timeout=60)
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert greedy(server) == before
