"""Prometheus metrics of the API process, served at /metrics when `--enable-metrics` is set.

Names follow SGLang (API_SPEC.md 7.1) with the `sglang:` prefix and a `model_name` label, so
dashboards written for SGLang read them unchanged. Where the numbers come from:
- Scheduler gauges (running/queued requests, KV usage, throughput, cache hit rate, kv_available /
  kv_evictable / kv_used) and the preemption counter: the engine's Heartbeat, about once a second
  (`on_heartbeat`). The engine owns those numbers; the API process only mirrors them.
  So is `num_grammar_queue_reqs` (requests waiting for a grammar compile).
- Constants set once from EngineReady (`on_ready`): `weight_memory_usage_gb`,
  `kv_cache_memory_usage_gb`, `max_total_num_tokens`, `context_len`, `page_size` (1: nl pages by
  token) and `startup_time_seconds{phase}` (load_weight, kv_cache_allocation, scheduler_e2e from
  the engine; tokenizer_e2e set by launch.py once uvicorn serves). nl runs unified (no
  prefill/decode disaggregation), so SGLang's PD queue gauges (`num_prefill_bootstrap_queue_reqs`,
  `num_prefill_inflight_queue_reqs`, `num_decode_prealloc_queue_reqs`,
  `num_decode_transfer_queue_reqs`) read 0, as on a unified SGLang server; the prefill and decode
  depths there are `num_queue_reqs` and `num_running_reqs`.
- Token counters and latency histograms: each finished request (`on_finish`);
  `inter_token_latency_seconds`: each token delta after the first (`on_tokens`).
- `sglang:func_latency_seconds{name=...}` and `http_requests_total`, `http_responses_total`,
  `http_requests_active{endpoint,method}`: a pure-ASGI middleware around the HTTP handlers (pure
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
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
               0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
PD_QUEUE_GAUGES = ("sglang:num_prefill_bootstrap_queue_reqs", "sglang:num_prefill_inflight_queue_reqs",
                   "sglang:num_decode_prealloc_queue_reqs", "sglang:num_decode_transfer_queue_reqs")

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
    "num_grammar_queue_reqs": ("sglang:num_grammar_queue_reqs",
                               "The number of requests waiting for a grammar compile."),
}
# SGLang's current names for the KV gauges above (the short ones are API_SPEC 7.1's).
HEARTBEAT_ALIASES = {"kv_available": "sglang:kv_available_tokens",
                     "kv_evictable": "sglang:kv_evictable_tokens", "kv_used": "sglang:kv_used_tokens"}
# EngineReady field -> (constant gauge, help)
READY_GAUGES = {
    "weight_memory_gb": ("sglang:weight_memory_usage_gb", "Memory the model weights take (GB)."),
    "kv_cache_memory_gb": ("sglang:kv_cache_memory_usage_gb", "Memory the KV cache takes (GB)."),
    "max_total_num_tokens": ("sglang:max_total_num_tokens", "KV pool size in tokens."),
    "context_len": ("sglang:context_len", "The model's context length."),
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
        gauge = lambda name, doc: Gauge(name, doc, names, registry=reg).labels(**self.labels)  # noqa: E731
        self.gauges = {field: [gauge(name, doc)] for field, (name, doc) in HEARTBEAT_GAUGES.items()}
        for field, name in HEARTBEAT_ALIASES.items():
            self.gauges[field].append(gauge(name, HEARTBEAT_GAUGES[field][1]))
        self.ready_gauges = {field: gauge(name, doc) for field, (name, doc) in READY_GAUGES.items()}
        gauge("sglang:page_size", "Tokens per KV page (nl pages by token).").set(1)
        for name in PD_QUEUE_GAUGES:  # unified serving: no disaggregation queues
            gauge(name, "Always 0: nl runs without prefill/decode disaggregation.")
        self.startup = Gauge("sglang:startup_time_seconds", "Start-up time per phase (seconds).",
                             names + ["phase"], registry=reg)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token "
                             "latency in seconds.", names, buckets=ITL_BUCKETS,
                             registry=reg).labels(**self.labels)
        http = ["endpoint", "method"]
        self.http_requests = Counter("sglang:http_requests", "HTTP requests received.", http,
                                     registry=reg)
        self.http_responses = Counter("sglang:http_responses", "HTTP responses sent.",
                                      ["endpoint", "status_code", "method"], registry=reg)
        self.http_active = Gauge("sglang:http_requests_active", "HTTP requests being handled.",
                                 http, registry=reg)
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
    def on_ready(self, ready: Any) -> None:
        """The engine's constants (EngineReady), set once."""
        for field, gauge in self.ready_gauges.items():
            gauge.set(float(getattr(ready, field, 0) or 0))
        for phase, seconds in (getattr(ready, "startup_seconds", None) or {}).items():
            self.set_startup_time(phase, seconds)

    def set_startup_time(self, phase: str, seconds: float) -> None:
        self.startup.labels(**self.labels, phase=phase).set(seconds)

    def on_tokens(self, gap: float, n: int) -> None:
        """`n` tokens arrived `gap` seconds after the request's previous ones (not its first)."""
        for _ in range(n):
            self.itl.observe(gap / n)

    def on_heartbeat(self, beat: Any) -> None:
        for field, gauges in self.gauges.items():
            for gauge in gauges:
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


class HttpMetricsMiddleware:
    """Pure ASGI: counts requests, responses (by status) and the requests in progress per route,
    and times the handlers of TIMED_PATHS, until each one's last body chunk is sent. Paths that
    are no route of the app count as endpoint "other" (no label per unknown URL)."""

    def __init__(self, app: Any, metrics: EngineMetrics, routes: Any):
        self.app, self.metrics, self.routes = app, metrics, routes
        self._paths: Optional[set[str]] = None

    def _endpoint(self, path: str) -> str:
        if self._paths is None:  # every route exists by the first request
            self._paths = {getattr(r, "path", None) for r in self.routes()}
        return path if path in self._paths else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        m = self.metrics
        endpoint = self._endpoint(path)
        m.http_requests.labels(endpoint=endpoint, method=method).inc()
        active = m.http_active.labels(endpoint=endpoint, method=method)
        active.inc()
        name = TIMED_PATHS.get(path)
        start = time.perf_counter()
        done = False

        async def counted_send(message):
            nonlocal done
            if message["type"] == "http.response.start":
                m.http_responses.labels(endpoint=endpoint, status_code=str(message["status"]),
                                        method=method).inc()
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not done:
                done = True
                active.dec()
                if name is not None:
                    m.func_latency.labels(name=name).observe(time.perf_counter() - start)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not done:  # the client went away, or the app raised
                active.dec()


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
    if getattr(tm, "ready", None) is not None:
        metrics.on_ready(tm.ready)

    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics/", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=lambda: app.routes)
    return metrics
