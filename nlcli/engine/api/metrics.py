"""Prometheus metrics of the API process, served at /metrics when `--enable-metrics` is set.

Names follow SGLang (API_SPEC.md 7.1) with the `sglang:` prefix and a `model_name` label, so
dashboards written for SGLang read them unchanged. Where the numbers come from:
- Scheduler gauges (running/queued requests, KV usage, throughput, cache hit rate, kv_available /
  kv_evictable / kv_used) and the preemption counter: the engine's Heartbeat, about once a second
  (`on_heartbeat`). The engine owns those numbers; the API process only mirrors them.
- Token counters and latency histograms: each finished request (`on_finish`).
- `sglang:func_latency_seconds{name=...}`: a pure-ASGI middleware timing the HTTP handlers (pure
  ASGI because BaseHTTPMiddleware hides `http.disconnect`, which abort-on-disconnect relies on).
All engine work happens in one API process, so a private registry per app is enough: no
multiprocess directory, and several apps in one test process do not clash.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 15.0, 20.0, 25.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
FUNC_BUCKETS = tuple(0.05 * 1.5**i for i in range(18))

# Heartbeat field -> (metric name, help). Missing fields (an older engine) read as 0.
HEARTBEAT_GAUGES = {
    "num_running_reqs": ("sglang:num_running_reqs", "The number of running requests."),
    "num_used_tokens": ("sglang:num_used_tokens", "The number of used KV cache tokens."),
    "token_usage": ("sglang:token_usage", "The token usage (used KV slots / pool size, 0-1)."),
    "gen_throughput": ("sglang:gen_throughput", "The generation throughput (token/s)."),
    "num_queue_reqs": ("sglang:num_queue_reqs", "The number of requests in the waiting queue."),
    "cache_hit_rate": ("sglang:cache_hit_rate", "The prefix cache hit rate (0-1)."),
    "kv_available": ("sglang:kv_available", "Free KV cache slots (tokens)."),
    "kv_evictable": ("sglang:kv_evictable", "KV slots held only by the radix cache (evictable)."),
    "kv_used": ("sglang:kv_used", "KV slots held by running requests."),
}

# HTTP path -> handler name for func_latency_seconds (SGLang labels by handler function).
TIMED_PATHS = {
    "/generate": "generate_request",
    "/encode": "encode_request",
    "/classify": "classify_request",
    "/judge": "classify_request",
    "/v1/completions": "openai_v1_completions",
    "/v1/chat/completions": "openai_v1_chat_completions",
    "/v1/embeddings": "openai_v1_embeddings",
    "/update_weights": "update_weights_from_disk",
    "/update_weights_from_disk": "update_weights_from_disk",
}


class EngineMetrics:
    """The collectors, and the two hooks the TokenizerManager calls (`tm.metrics`)."""

    def __init__(self, model_name: str, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name}
        names = ["model_name"]
        reg = self.registry
        self.gauges = {field: Gauge(name, doc, names, registry=reg).labels(**self.labels)
                       for field, (name, doc) in HEARTBEAT_GAUGES.items()}
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.",
                                     names, registry=reg).labels(**self.labels)
        self.generation_tokens = Counter("sglang:generation_tokens",
                                         "Number of generation tokens processed.", names,
                                         registry=reg).labels(**self.labels)
        self.cached_tokens = Counter("sglang:cached_tokens", "Prompt tokens served from the "
                                     "prefix cache.", names, registry=reg).labels(**self.labels)
        self.num_requests = Counter("sglang:num_requests", "Finished requests.", names,
                                    registry=reg).labels(**self.labels)
        self.num_aborted = Counter("sglang:num_aborted_requests", "Requests that ended in an abort.",
                                   names, registry=reg).labels(**self.labels)
        self.preemptions = Counter("sglang:num_preemptions", "Requests retracted to the queue "
                                   "because the KV pool ran dry.", names,
                                   registry=reg).labels(**self.labels)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Histogram of time to first "
                              "token in seconds.", names, buckets=TTFT_BUCKETS,
                              registry=reg).labels(**self.labels)
        self.tpot = Histogram("sglang:time_per_output_token_seconds", "Histogram of time per "
                              "output token in seconds.", names, buckets=TPOT_BUCKETS,
                              registry=reg).labels(**self.labels)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end "
                             "request latency in seconds", names, buckets=E2E_BUCKETS,
                             registry=reg).labels(**self.labels)
        self.func_latency = Histogram("sglang:func_latency_seconds", "Function latency in seconds",
                                      ["name"], buckets=FUNC_BUCKETS, registry=reg)
        self._retractions_seen = 0

    # ---- hooks -------------------------------------------------------------------------------
    def on_heartbeat(self, beat: Any) -> None:
        for field, gauge in self.gauges.items():
            gauge.set(float(getattr(beat, field, 0) or 0))
        # The engine counts retractions since it started; the counter takes the increase.
        total = int(getattr(beat, "num_retractions", 0) or 0)
        if total > self._retractions_seen:
            self.preemptions.inc(total - self._retractions_seen)
        self._retractions_seen = total

    def on_finish(self, state: Any, meta: dict) -> None:
        """`state`: the request's ReqState (created / first_token_time, perf_counter seconds)."""
        now = time.perf_counter()
        prompt, completion = int(meta.get("prompt_tokens") or 0), int(meta.get("completion_tokens") or 0)
        self.num_requests.inc()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(int(meta.get("cached_tokens") or 0))
        finish = meta.get("finish_reason")
        if isinstance(finish, dict) and finish.get("type") == "abort":
            self.num_aborted.inc()
        created = getattr(state, "created", None)
        if created is None:
            return
        self.e2e.observe(now - created)
        first = getattr(state, "first_token_time", None)
        if first is not None:
            self.ttft.observe(first - created)
            if completion > 1:
                self.tpot.observe((now - first) / (completion - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FuncLatencyMiddleware:
    """Pure ASGI: observes how long each timed route takes, until its last body chunk is sent."""

    def __init__(self, app: Any, metrics: EngineMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        name = TIMED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None:
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        done = False

        async def timed_send(message):
            nonlocal done
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not done:
                done = True
                self.metrics.func_latency.labels(name=name).observe(time.perf_counter() - start)

        await self.app(scope, receive, timed_send)


def mount_metrics(app: Any, tm: Any, args: Any) -> EngineMetrics:
    """Add GET /metrics (and /metrics/) to the FastAPI `app`, time its handlers, and attach the
    collectors to the TokenizerManager. Call inside create_app before any wrapping middleware."""
    from fastapi.responses import Response

    name = getattr(args, "served_model_name", None) or getattr(args, "model_path", None) or "default"
    metrics = EngineMetrics(str(name))
    tm.metrics = metrics
    gauges = getattr(tm, "gauges", None)
    if gauges is not None:
        metrics.on_heartbeat(gauges)

    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics/", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(FuncLatencyMiddleware, metrics=metrics)
    return metrics
