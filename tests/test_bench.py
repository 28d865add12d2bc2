"""`nl bench`: its datasets, its statistics, and its --json report against a live `nl serve`
(fake runner: real scheduler, paging and radix cache, byte-level tokenizer, so every prompt's
token count is its UTF-8 length)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nlcli.bench.datasets import WORDS, random_requests, shared_prefix_requests
from nlcli.bench.report import percentile

NL = os.path.join(os.path.dirname(sys.executable), "nl")


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.random(n).tolist()
        for q in (0, 50, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_random_dataset_lengths_and_seed():
    reqs = random_requests(200, 384, 128, 0.125, seed=3, output_range_ratio=1.0)
    lens = [len(r.prompt.split()) for r in reqs]
    assert min(lens) >= 48 and max(lens) <= 384
    assert max(lens) - min(lens) > 200  # really spread over the range, not one length
    assert {r.output_len for r in reqs} == {128}
    assert all(w in WORDS for r in reqs[:5] for w in r.prompt.split())
    assert [r.prompt for r in random_requests(5, 50, 8, 0.5, seed=3)] == \
        [r.prompt for r in random_requests(5, 50, 8, 0.5, seed=3)]
    assert random_requests(5, 50, 8, 0.5, seed=3)[0].prompt != random_requests(5, 50, 8, 0.5, seed=4)[0].prompt


def test_shared_prefix_dataset_shares_exactly_the_prefix():
    reqs = shared_prefix_requests(6, 100, 5, 16, num_groups=2, seed=0)
    groups = {}
    for r in reqs:
        prefix = r.prompt.split("\n\n")[0]
        assert len(prefix.split()) == 100
        groups.setdefault(r.group, set()).add(prefix)
    assert [len(v) for v in groups.values()] == [1, 1]
    assert groups[0] != groups[1]
    assert len({r.prompt for r in reqs}) == 6


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.test_scheduler_fakes import LiveServer

    srv = LiveServer(str(tmp_path_factory.mktemp("bench")))
    yield srv
    srv.stop()


def _bench(live, *args: str) -> dict:
    r = subprocess.run([NL, "bench", "--url", live.url, "--json", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def test_bench_random_report(live):
    args = dict(num=6, inp=30, out=12, ratio=0.5, seed=5)
    rep = _bench(live, "--num-prompts", "6", "--random-input-len", "30", "--random-output-len",
                 "12", "--random-range-ratio", "0.5", "--seed", "5", "--max-concurrency", "2")
    reqs = random_requests(args["num"], args["inp"], args["out"], args["ratio"], args["seed"])
    assert rep["completed"] == 6 and rep["failed"] == 0 and rep["errors"] == []
    # ignore_eos: every request produced exactly the tokens it asked for.
    assert rep["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert rep["total_input_tokens"] == sum(len(r.prompt.encode()) for r in reqs)
    dur = rep["duration_s"]
    assert rep["request_throughput"] == pytest.approx(6 / dur)
    assert rep["output_throughput"] == pytest.approx(rep["total_output_tokens"] / dur)
    assert rep["input_throughput"] == pytest.approx(rep["total_input_tokens"] / dur)
    assert rep["concurrency"] <= 2.05  # --max-concurrency holds
    for key in ("ttft", "itl", "tpot", "e2e_latency"):
        mean, median, p99 = (rep[f"{s}_{key}_ms"] for s in ("mean", "median", "p99"))
        assert 0 < median <= p99 and mean > 0, key
    assert rep["mean_ttft_ms"] < rep["mean_e2e_latency_ms"]
    assert rep["max_concurrency"] == 2 and rep["request_rate"] is None


def test_bench_shared_prefix_hits_the_cache(live):
    rep = _bench(live, "--dataset-name", "shared-prefix", "--num-prompts", "8",
                 "--shared-prefix-len", "60", "--question-len", "4", "--random-output-len", "4",
                 "--request-rate", "50")
    assert rep["completed"] == 8
    assert rep["cache_hit_rate"] == pytest.approx(rep["total_cached_tokens"] / rep["total_input_tokens"])
    assert rep["cache_hit_rate"] > 0.8


def test_bench_table_and_unreachable_server(live):
    r = subprocess.run([NL, "bench", "--url", live.url, "--num-prompts", "2", "--random-input-len",
                        "5", "--random-output-len", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for label in ("Request throughput", "Output token throughput", "TTFT median", "p99",
                  "Inter-token latency", "E2E latency", "Cache hit rate"):
        assert label in r.stdout
    r = subprocess.run([NL, "bench", "--url", "http://127.0.0.1:9", "--json", "--num-prompts", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert json.loads(r.stdout)["ok"] is False
