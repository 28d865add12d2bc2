"""Data-parallel routing: `nl serve --dp-size 2` with --load-balance-method cache_aware vs
round_robin on a shared-prefix workload (4 distinct prefixes x 16 requests, in a seeded shuffled
order, sent with bounded concurrency). For each method it prints the prefix-cache hit rate
(cached / prompt tokens, from the groups' own counters in /get_server_info, cross-checked with
the requests' meta_info.cached_tokens), how the requests split over the groups, and TTFT
(median and p90, streamed).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/dp_cache_aware.py
    ... benchmarks/dp_cache_aware.py --model-path DIR --per-prefix 2 --prefix-words 16  # smoke

Each method gets a fresh server (cold caches). `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from nlcli.engine.distributed.node import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ("the history of the Roman empire", "how a compiler optimises loops",
          "the chemistry of baking bread", "the rules of contract bridge", "tidal energy",
          "the life cycle of stars", "medieval castle design", "jazz improvisation")


def workload(prefixes: int, per_prefix: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for p in range(prefixes):
        stem = f"You are an expert on {TOPICS[p % len(TOPICS)]}. " + " ".join(
            rng.choice(("context", "detail", "fact", "note", "source", "example")) + str(i)
            for i in range(words))
        out += [f"{stem}\nQuestion {q}: explain point {rng.randint(0, 999)}." for q in range(per_prefix)]
    rng.shuffle(out)
    return out


def start_server(args, method: str, log_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "nl"), "serve", "--port", str(port),
           "--dp-size", str(args.dp_size), "--load-balance-method", method]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    log = open(os.path.join(log_dir, f"serve-{method}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"nl serve ({method}) exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health_generate", timeout=30).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"nl serve ({method}) did not start in {args.startup_timeout} s; see {log.name}")


async def one(client: httpx.AsyncClient, url: str, text: str, max_new: int) -> tuple[float, int]:
    """(TTFT seconds, cached tokens) of one streamed request."""
    body = {"text": text, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    start, ttft, cached = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            cached = json.loads(line[5:])["meta_info"].get("cached_tokens", cached)
    return ttft or 0.0, cached


async def drive(url: str, texts: list[str], concurrency: int, max_new: int) -> list[tuple[float, int]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def guarded(text: str):
            async with sem:
                return await one(client, url, text, max_new)
        return await asyncio.gather(*(guarded(t) for t in texts))


def measure(args, method: str, texts: list[str], log_dir: str) -> dict:
    proc, url = start_server(args, method, log_dir)
    try:
        before = httpx.get(url + "/get_server_info").json()["internal_states"]
        results = asyncio.run(drive(url, texts, args.concurrency, args.max_new_tokens))
        after = httpx.get(url + "/get_server_info").json()["internal_states"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    prompt = sum(a["prompt_tokens"] - b["prompt_tokens"] for a, b in zip(after, before))
    cached = sum(a["cached_tokens"] - b["cached_tokens"] for a, b in zip(after, before))
    ttfts = sorted(t for t, _ in results)
    return {"method": method, "requests": len(texts), "prompt_tokens": prompt,
            "cached_tokens": cached, "cache_hit_rate": cached / prompt if prompt else 0.0,
            "meta_cached_tokens": sum(c for _, c in results),
            "per_group": [a["num_finished_reqs"] - b["num_finished_reqs"]
                          for a, b in zip(after, before)],
            "ttft_median_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default=None, help="default: nl's embedded model")
    ap.add_argument("--dp-size", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["cache_aware", "round_robin"])
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--per-prefix", type=int, default=16)
    ap.add_argument("--prefix-words", type=int, default=200, help="words in each shared prefix")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    texts = workload(args.prefixes, args.per_prefix, args.prefix_words, args.seed)
    log_dir = tempfile.mkdtemp(prefix="nl-dp-bench-")
    rows = [measure(args, m, texts, log_dir) for m in args.methods]
    print(f"{'method':<12} {'hit rate':>8} {'cached/prompt':>15} {'per group':>12} "
          f"{'TTFT p50 ms':>11} {'TTFT p90 ms':>11}")
    for r in rows:
        print(f"{r['method']:<12} {100 * r['cache_hit_rate']:>7.1f}% "
              f"{r['cached_tokens']:>7}/{r['prompt_tokens']:<7} {str(r['per_group']):>12} "
              f"{r['ttft_median_ms']:>11.1f} {r['ttft_p90_ms']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
