"""`nl bench`: drive a running server with generated prompts and report throughput and latency.

Like SGLang's bench_serving: datasets `random` and `shared-prefix`, Poisson arrivals, bounded
concurrency, streaming /generate with ignore_eos. The summary table is the result (stdout);
progress goes to stderr. Exit 0 when at least one request succeeded, 1 when none did, 3 when the
server cannot be reached.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Optional

import typer

from nlcli.commands.common import EXIT_INTERRUPTED, Settings, client_command, fail
from nlcli.console import consoles, print_json

DATA = "Dataset"
LOAD = "Load"


def _opt(help: str, panel: str = DATA, **kw):
    return typer.Option(help=help, rich_help_panel=panel, **kw)


@client_command
def bench(
    ctx: typer.Context,
    dataset_name: Annotated[str, _opt("random or shared-prefix.")] = "random",
    num_prompts: Annotated[int, _opt("Number of requests.", LOAD, min=1)] = 32,
    random_input_len: Annotated[int, _opt("Input words (the maximum).",
                                          min=1)] = 384,
    random_output_len: Annotated[int, _opt("Output tokens per request (ignore_eos).", min=1)] = 128,
    random_range_ratio: Annotated[float, _opt("Lengths are uniform in len x ratio..len.",
                                              min=0.0, max=1.0)] = 1.0,
    output_ratio: Annotated[Optional[float], _opt(
        "Output lengths only (default: the range ratio).", min=0.0, max=1.0,
        show_default=False)] = None,
    shared_prefix_len: Annotated[int, _opt("shared-prefix: prefix length in words.", min=1)] = 700,
    shared_prefix_groups: Annotated[int, _opt("shared-prefix: number of distinct prefixes.",
                                              min=1)] = 1,
    question_len: Annotated[int, _opt("shared-prefix: words after the prefix.", min=1)] = 32,
    max_concurrency: Annotated[Optional[int], _opt("At most this many requests in flight.", LOAD,
                                                   min=1, show_default=False)] = None,
    request_rate: Annotated[float, _opt("Requests per second, Poisson arrivals (inf: all at once).",
                                        LOAD)] = math.inf,
    warmup_requests: Annotated[int, _opt("Prompts sent once before timing starts.", LOAD,
                                         min=0)] = 1,
    temperature: Annotated[float, _opt("Sampling temperature.", LOAD, min=0.0)] = 0.0,
    seed: Annotated[int, _opt("Seed for prompts and arrival times.", LOAD)] = 1,
    *,
    s: Settings,
) -> None:
    """Benchmark a running server: throughput, TTFT, inter-token and end-to-end latency."""
    import httpx

    from nlcli.bench import datasets
    from nlcli.bench.driver import run_benchmark
    from nlcli.bench.report import render, summarize

    if request_rate <= 0:
        raise typer.BadParameter("must be positive (inf: all at once)", param_hint="--request-rate")
    if dataset_name == "random":
        reqs = datasets.random_requests(num_prompts, random_input_len, random_output_len,
                                        random_range_ratio, seed, output_ratio)
    elif dataset_name == "shared-prefix":
        reqs = datasets.shared_prefix_requests(num_prompts, shared_prefix_len, question_len,
                                               random_output_len, shared_prefix_groups, seed)
    else:
        raise typer.BadParameter("choose random or shared-prefix", param_hint="--dataset-name")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines on stderr
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    import asyncio

    try:
        results, duration = asyncio.run(run_benchmark(
            s.url, reqs, api_key=s.api_key, timeout=s.timeout, request_rate=request_rate,
            max_concurrency=max_concurrency, warmup=min(warmup_requests, len(reqs)), seed=seed,
            temperature=temperature))
    except httpx.ConnectError as e:
        raise fail(s, f"cannot reach {s.url}: {e}", 3) from None
    except RuntimeError as e:
        raise fail(s, str(e), 1) from None
    except KeyboardInterrupt:
        raise fail(s, "interrupted", EXIT_INTERRUPTED) from None
    config = {"backend": "nl", "dataset": dataset_name, "num_prompts": num_prompts,
              "max_concurrency": max_concurrency,
              "request_rate": request_rate if math.isfinite(request_rate) else None,
              "random_input_len": random_input_len, "random_output_len": random_output_len,
              "random_range_ratio": random_range_ratio,
              "output_ratio": output_ratio, "seed": seed}
    if dataset_name == "shared-prefix":
        config.update(shared_prefix_len=shared_prefix_len,
                      shared_prefix_groups=shared_prefix_groups, question_len=question_len)
    summary = summarize(results, duration, config)
    if s.json:
        print_json(summary)
    else:
        c = consoles()
        c.out.print(render(summary))
        for err in summary["errors"]:
            c.err.print(f"[red]failed request[/]: {err}", markup=True, highlight=False)
    if summary["completed"] == 0:
        raise typer.Exit(1)
