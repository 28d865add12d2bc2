"""The request loop: stream each prompt through /generate and time it.

Arrivals follow a Poisson process at `request_rate` (inf: all at once), at most `max_concurrency`
requests are in flight, every request sets `ignore_eos` so its output length is the one asked for.
Timing is client-side (perf_counter): TTFT is the first event that carries a token, inter-token
latencies are the gaps between later events. Token counts come from the server's meta_info.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
import orjson

from nlcli.bench.datasets import BenchRequest

logger = logging.getLogger("nlcli.bench")


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _body(req: BenchRequest, temperature: float) -> dict:
    return {"text": req.prompt, "stream": True,
            "sampling_params": {"max_new_tokens": req.output_len, "ignore_eos": True,
                                "temperature": temperature}}


async def send_one(client: httpx.AsyncClient, req: BenchRequest, temperature: float = 0.0) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    meta: dict = {}
    try:
        async with client.stream("POST", "/generate", json=_body(req, temperature)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = orjson.loads(data)
                if "error" in event:
                    res.error = str(event["error"])
                    return res
                now = time.perf_counter()
                meta = event.get("meta_info") or {}
                if meta.get("completion_tokens", 0) and not res.ttft:
                    res.ttft = now - start
                elif res.ttft:
                    res.itls.append(now - last)
                last = now
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        res.error = f"aborted: {finish.get('message')}"
        return res
    res.prompt_tokens = int(meta.get("prompt_tokens") or 0)
    res.completion_tokens = int(meta.get("completion_tokens") or 0)
    res.cached_tokens = int(meta.get("cached_tokens") or 0)
    res.ok = bool(meta)
    if not res.ok:
        res.error = "the stream ended without a result"
    return res


def make_client(url: str, api_key: Optional[str], timeout: float, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout, connect=5.0))


async def run_benchmark(url: str, requests: list[BenchRequest], *, api_key: Optional[str] = None,
                        timeout: float = 300.0, request_rate: float = math.inf,
                        max_concurrency: Optional[int] = None, warmup: int = 1, seed: int = 0,
                        temperature: float = 0.0) -> tuple[list[RequestResult], float]:
    """Run `requests`; returns (results in request order, benchmark duration in seconds).

    The first `warmup` prompts are sent once, one after another, before the clock starts (as
    bench_serving's initial test run): they pay any lazy start-up cost and fail fast on a bad
    server. Warm-up requests are not counted."""
    rng = random.Random(seed)
    in_flight = max_concurrency or len(requests) or 1
    async with make_client(url, api_key, timeout, in_flight + 1) as client:
        await client.get("/health")  # an unreachable server raises httpx.ConnectError here
        for req in requests[:warmup]:
            first = await send_one(client, req, temperature)
            if not first.ok:
                raise RuntimeError(f"warm-up request failed: {first.error}")
        logger.info("Warm-up done; sending %d requests (rate %s, max concurrency %s)",
                    len(requests), request_rate, max_concurrency or "unbounded")
        gate = asyncio.Semaphore(in_flight)

        async def limited(req: BenchRequest) -> RequestResult:
            async with gate:
                return await send_one(client, req, temperature)

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration
