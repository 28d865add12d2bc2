"""Prometheus metrics (API_SPEC.md 7.1): names, the model_name label, and values that follow the
requests served, read back through prometheus_client's own exposition parser."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nlcli.engine.io_struct import EngineReady, Heartbeat
from nlcli.engine.api.metrics import HEARTBEAT_GAUGES, PD_QUEUE_GAUGES, EngineMetrics, mount_metrics

SPEC_NAMES = [
    "sglang:num_running_reqs", "sglang:num_used_tokens", "sglang:token_usage",
    "sglang:gen_throughput", "sglang:num_queue_reqs", "sglang:cache_hit_rate",
    "sglang:kv_available", "sglang:kv_evictable", "sglang:kv_used",
    "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
    "sglang:num_preemptions_total",
    "sglang:time_to_first_token_seconds_count", "sglang:time_per_output_token_seconds_count",
    "sglang:e2e_request_latency_seconds_count",
]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, model: str) -> float:
    return samples(text)[(name, (("model_name", model),))]


def test_heartbeat_and_finished_requests_feed_the_collectors():
    m = EngineMetrics("tiny")
    beat = Heartbeat(num_running_reqs=3, num_queue_reqs=2, num_used_tokens=120, token_usage=0.25,
                     cache_hit_rate=0.5, gen_throughput=42.0, num_retractions=2)
    m.on_heartbeat(beat)
    m.on_heartbeat(Heartbeat(num_retractions=5))  # counter takes increases, not the total twice
    m.on_heartbeat(Heartbeat(num_running_reqs=3, num_queue_reqs=2, num_used_tokens=120,
                             token_usage=0.25, cache_hit_rate=0.5, gen_throughput=42.0,
                             num_retractions=5))
    t0 = time.perf_counter() - 2.0
    m.on_finish(SimpleNamespace(created=t0, first_token_time=t0 + 0.5),
                {"prompt_tokens": 10, "completion_tokens": 4, "cached_tokens": 3,
                 "finish_reason": {"type": "length", "length": 4}})
    m.on_finish(SimpleNamespace(created=t0, first_token_time=None),
                {"prompt_tokens": 7, "completion_tokens": 0, "cached_tokens": 0,
                 "finish_reason": {"type": "abort", "message": "x"}})
    text = m.render().decode()
    for name in SPEC_NAMES:
        assert (name, (("model_name", "tiny"),)) in samples(text), name
    assert value(text, "sglang:num_running_reqs", "tiny") == 3
    assert value(text, "sglang:num_queue_reqs", "tiny") == 2
    assert value(text, "sglang:token_usage", "tiny") == 0.25
    assert value(text, "sglang:cache_hit_rate", "tiny") == 0.5
    assert value(text, "sglang:num_preemptions_total", "tiny") == 5
    assert value(text, "sglang:prompt_tokens_total", "tiny") == 17
    assert value(text, "sglang:generation_tokens_total", "tiny") == 4
    assert value(text, "sglang:cached_tokens_total", "tiny") == 3
    assert value(text, "sglang:num_aborted_requests_total", "tiny") == 1
    assert value(text, "sglang:e2e_request_latency_seconds_count", "tiny") == 2
    assert value(text, "sglang:time_to_first_token_seconds_count", "tiny") == 1
    assert value(text, "sglang:time_to_first_token_seconds_sum", "tiny") == pytest.approx(0.5)
    assert value(text, "sglang:time_per_output_token_seconds_count", "tiny") == 1
    # 1.5 s after the first token for 3 more tokens: 0.5 s each (plus the test's own few ms).
    assert value(text, "sglang:time_per_output_token_seconds_sum", "tiny") == pytest.approx(0.5, abs=0.05)
    assert set(HEARTBEAT_GAUGES) >= {"kv_available", "kv_evictable", "kv_used"}


def test_mount_metrics_serves_route_and_times_handlers():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/generate")
    async def generate():
        return {"text": "ok"}

    tm = SimpleNamespace(metrics=None, gauges=Heartbeat(num_running_reqs=1))
    args = SimpleNamespace(served_model_name=None, model_path="/m/x.gguf")
    mount_metrics(app, tm, args)
    assert tm.metrics is not None
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post("/generate").status_code == 200
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert client.get("/metrics/").status_code == 200
    s = samples(r.text)
    assert s[("sglang:func_latency_seconds_count", (("name", "generate_request"),))] == 3
    assert value(r.text, "sglang:num_running_reqs", "/m/x.gguf") == 1
    gen = (("endpoint", "/generate"), ("method", "POST"))
    assert s[("sglang:http_requests_total", gen)] == 3
    assert s[("sglang:http_responses_total", gen[:1] + (("method", "POST"), ("status_code", "200")))] == 3
    assert s[("sglang:http_requests_active", gen)] == 0
    # The scrape itself is in progress while it renders.
    assert s[("sglang:http_requests_active", (("endpoint", "/metrics"), ("method", "GET")))] == 1


def test_engine_constants_grammar_queue_and_inter_token_latency():
    m = EngineMetrics("tiny")
    m.on_ready(EngineReady(max_total_num_tokens=1000, max_prefill_tokens=16, max_running_requests=4,
                           context_len=512, device="cpu", dtype="float32", weight_memory_gb=0.5,
                           kv_cache_memory_gb=0.25,
                           startup_seconds={"load_weight": 1.5, "scheduler_e2e": 3.0}))
    m.set_startup_time("tokenizer_e2e", 4.0)
    m.on_heartbeat(Heartbeat(num_grammar_queue_reqs=2, kv_used=7, kv_available=3))
    m.on_tokens(0.1, 1)
    m.on_tokens(0.3, 3)  # 3 tokens in one delta: 0.1 s each
    text = m.render().decode()
    assert value(text, "sglang:weight_memory_usage_gb", "tiny") == 0.5
    assert value(text, "sglang:kv_cache_memory_usage_gb", "tiny") == 0.25
    assert value(text, "sglang:max_total_num_tokens", "tiny") == 1000
    assert value(text, "sglang:context_len", "tiny") == 512
    assert value(text, "sglang:page_size", "tiny") == 1
    assert value(text, "sglang:num_grammar_queue_reqs", "tiny") == 2
    assert value(text, "sglang:kv_used_tokens", "tiny") == 7
    assert value(text, "sglang:kv_available_tokens", "tiny") == 3
    for name in PD_QUEUE_GAUGES:
        assert value(text, name, "tiny") == 0
    s = samples(text)
    phase = lambda p: s[("sglang:startup_time_seconds", (("model_name", "tiny"), ("phase", p)))]  # noqa: E731
    assert (phase("load_weight"), phase("scheduler_e2e"), phase("tokenizer_e2e")) == (1.5, 3.0, 4.0)
    assert value(text, "sglang:inter_token_latency_seconds_count", "tiny") == 4
    assert value(text, "sglang:inter_token_latency_seconds_sum", "tiny") == pytest.approx(0.4)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.test_scheduler_fakes import LiveServer

    srv = LiveServer(str(tmp_path_factory.mktemp("metrics")),
                     args=["--enable-metrics", "--served-model-name", "tiny-fake"])
    yield srv
    srv.stop()


def test_live_metrics_follow_a_request(live):
    before = httpx.get(live.url + "/metrics", timeout=30)
    assert before.status_code == 200, "create_app must call mount_metrics when --enable-metrics"
    r = httpx.post(live.url + "/generate", timeout=60, json={
        "text": "metrics please", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    meta = r.json()["meta_info"]
    time.sleep(1.2)  # one heartbeat, so the gauges are fresh
    after = httpx.get(live.url + "/metrics/", timeout=30).text
    for name in SPEC_NAMES:
        assert (name, (("model_name", "tiny-fake"),)) in samples(after), name
    delta = lambda name: value(after, name, "tiny-fake") - value(before.text, name, "tiny-fake")  # noqa: E731
    assert delta("sglang:prompt_tokens_total") == meta["prompt_tokens"]
    assert delta("sglang:generation_tokens_total") == meta["completion_tokens"] == 5
    assert delta("sglang:e2e_request_latency_seconds_count") == 1
    assert value(after, "sglang:num_running_reqs", "tiny-fake") == 0
    s = samples(after)
    assert s[("sglang:func_latency_seconds_count", (("name", "generate_request"),))] >= 1


def test_live_new_metrics_and_uvicorn_line(live):
    # uvicorn's own start line, which tools wait for, besides the panel.
    assert f"Uvicorn running on http://127.0.0.1:{live.port} (Press CTRL+C to quit)" in live.log()
    before = httpx.get(live.url + "/metrics", timeout=30).text
    events = []
    with httpx.stream("POST", live.url + "/generate", timeout=60, json={
            "text": "itl please", "stream": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    completion = orjson.loads(events[-1][6:])["meta_info"]["completion_tokens"]
    after = httpx.get(live.url + "/metrics", timeout=30).text
    delta = lambda name: value(after, name, "tiny-fake") - value(before, name, "tiny-fake")  # noqa: E731
    # One interval per streamed token after the first.
    assert delta("sglang:inter_token_latency_seconds_count") == completion - 1 == 5
    s = samples(after)
    gen = (("endpoint", "/generate"), ("method", "POST"))
    assert s[("sglang:http_requests_total", gen)] >= 2
    assert s[("sglang:http_requests_active", gen)] == 0
    assert s[("sglang:http_requests_active", (("endpoint", "/metrics"), ("method", "GET")))] == 1
    info = httpx.get(live.url + "/get_server_info", timeout=30).json()
    pool = info["max_total_num_tokens"]
    assert value(after, "sglang:max_total_num_tokens", "tiny-fake") == pool
    # The fake runner's KV pool is one int64 per slot (plus the dummy slot 0).
    assert value(after, "sglang:kv_cache_memory_usage_gb", "tiny-fake") == pytest.approx(
        (pool + 1) * 8 / 2**30)
    assert value(after, "sglang:num_grammar_queue_reqs", "tiny-fake") == 0
    phases = {dict(k[1])["phase"]: v for k, v in s.items() if k[0] == "sglang:startup_time_seconds"}
    assert phases["scheduler_e2e"] > 0 and phases["tokenizer_e2e"] >= phases["scheduler_e2e"]
