"""The benchmark summary: throughputs, latency statistics and the prefix-cache hit rate.

Field names follow SGLang's bench_serving JSON (`request_throughput`, `mean_ttft_ms`, ...) so
scripts written for it read ours. Throughputs divide by the wall time from the first request sent
to the last one finished; latency statistics cover successful requests only.
"""

from __future__ import annotations

import statistics
from typing import Any

from nlcli.bench.driver import RequestResult


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(prefix: str, seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    return {
        f"mean_{prefix}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{prefix}_ms": statistics.median(ms) if ms else 0.0,
        f"p99_{prefix}_ms": percentile(ms, 99),
    }


def summarize(results: list[RequestResult], duration: float, config: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.completion_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    dur = max(duration, 1e-9)
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    summary: dict[str, Any] = {
        **config,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "total_cached_tokens": cached,
        "cache_hit_rate": cached / prompt if prompt else 0.0,
        "request_throughput": len(ok) / dur,
        "input_throughput": prompt / dur,
        "output_throughput": output / dur,
        "total_throughput": (prompt + output) / dur,
        **_stats("ttft", [r.ttft for r in ok]),
        **_stats("itl", [x for r in ok for x in r.itls]),
        **_stats("tpot", tpots),
        **_stats("e2e_latency", [r.latency for r in ok]),
        "concurrency": sum(r.latency for r in ok) / dur,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    return summary


def render(summary: dict[str, Any]):
    """A rich Table of the summary, for people."""
    from rich.table import Table

    t = Table(title=f"nl bench: {summary.get('dataset', '?')}", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rate = summary.get("request_rate")
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Max concurrency", f"{summary.get('max_concurrency') or 'unbounded'}"),
        ("Request rate (req/s)", "inf" if rate is None else f"{rate:g}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total generated tokens", f"{summary['total_output_tokens']}"),
        ("Cache hit rate (cached / prompt tokens)", f"{100 * summary['cache_hit_rate']:.2f}%"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{summary['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
    ]
    for name, key in (("TTFT", "ttft"), ("Inter-token latency", "itl"), ("TPOT", "tpot"),
                      ("E2E latency", "e2e_latency")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{name} {stat} (ms)", f"{summary[f'{stat}_{key}_ms']:.2f}"))
    for name, value in rows:
        t.add_row(name, value)
    return t
