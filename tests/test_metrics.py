"""Prometheus metrics (API_SPEC.md 7.1): names, the model_name label, and values that follow the
requests served, read back through prometheus_client's own exposition parser."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nlcli.engine.io_struct import Heartbeat
from nlcli.engine.api.metrics import HEARTBEAT_GAUGES, EngineMetrics, mount_metrics

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
