"""`nl serve --dp-size 2` end to end on the fake runner (real scheduler and prefix cache): both
engine groups serve, cache_aware routing beats round_robin's cache hit rate on a shared-prefix
workload (asserted on each group's own counters in /get_server_info), control routes reach every
group, and a dying group ends the server non-zero."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow

# 4 distinct shared prefixes x 4 requests each, the requests of one prefix back to back (so
# round_robin alternates every prefix between the two groups; any order works for cache_aware).
PREFIXES = [f"{name} " * 24 for name in ("alpha", "bravo", "charlie", "delta")]
WORKLOAD = [p + f"question {i}?" for p in PREFIXES for i in range(4)]


def _states(url: str) -> list[dict]:
    return httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"]


def _run_workload(url: str) -> tuple[int, int, int]:
    """(prompt tokens, cached tokens by the groups' counters, cached tokens by meta_info)."""
    before = _states(url)
    meta_cached = 0
    for text in WORKLOAD:
        r = httpx.post(url + "/generate", json={"text": text, "sampling_params": {
            "max_new_tokens": 2, "temperature": 0}}, timeout=60)
        assert r.status_code == 200, r.text
        meta_cached += r.json()["meta_info"]["cached_tokens"]
    after = _states(url)
    prompt = sum(a["prompt_tokens"] - b["prompt_tokens"] for a, b in zip(after, before))
    cached = sum(a["cached_tokens"] - b["cached_tokens"] for a, b in zip(after, before))
    assert all(a["num_finished_reqs"] > b["num_finished_reqs"] for a, b in zip(after, before)), \
        f"a group served nothing: {after}"
    return prompt, cached, meta_cached


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started: dict[str, LiveServer] = {}
    errors: list[BaseException] = []

    def start(method: str) -> None:
        try:
            started[method] = LiveServer(str(tmp_path_factory.mktemp(method)),
                                         ["--dp-size", "2", "--load-balance-method", method])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    # Both servers start at once: most of a start is waiting for the engines to import.
    # (transformers' lazy imports are not thread-safe: resolve the tokenizer class here first.)
    from transformers import PreTrainedTokenizerFast  # noqa: F401
    threads = [threading.Thread(target=start, args=(m,)) for m in ("cache_aware", "round_robin")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        for srv in started.values():
            srv.stop()


def test_both_groups_serve_and_cache_aware_hits_more(servers):
    rates = {}
    for method, srv in servers.items():
        prompt, cached, meta_cached = _run_workload(srv.url)
        assert cached == meta_cached  # the groups' counters agree with what requests reported
        rates[method] = cached / prompt
    # round_robin sends each prefix to both groups (two cold prefills), cache_aware to one.
    assert rates["cache_aware"] > rates["round_robin"] + 0.05, rates
    states = _states(servers["cache_aware"].url)
    assert [s["dp_rank"] for s in states] == [0, 1]
    assert all(s["num_in_flight_reqs"] == 0 for s in states)


def test_control_routes_cover_every_group(servers):
    url = servers["cache_aware"].url
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    before = _states(url)  # /health_generate probes every group
    assert httpx.get(url + "/health_generate", timeout=30).status_code == 200
    assert [s["num_routed_reqs"] for s in _states(url)] == [s["num_routed_reqs"] + 1
                                                             for s in before]
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PREFIXES[0],
                                                  "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.post(url + "/pause_generation", json={"mode": "retract"}).status_code == 200
    assert httpx.post(url + "/continue_generation", json={}).status_code == 200
    assert httpx.post(url + "/flush_cache", timeout=60).status_code == 200
    # Every group flushed: the most-repeated prefix is cold again wherever it is routed.
    r = httpx.post(url + "/generate", json={"text": WORKLOAD[0], "sampling_params": {
        "max_new_tokens": 2}}, timeout=60)
    assert r.json()["meta_info"]["cached_tokens"] == 0
    assert httpx.post(url + "/abort_request", json={"abort_all": True}).status_code == 200
    assert all(s["num_in_flight_reqs"] == 0 for s in _states(url))


def test_a_dying_group_ends_the_server(servers):
    srv = servers["round_robin"]
    engines = []
    for pid in srv.engine_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                engines.append(pid)
    assert len(engines) == 2
    os.kill(engines[1], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while srv.proc.poll() is None:
        assert time.monotonic() < deadline, "the server kept running without one group"
        time.sleep(0.2)
    assert srv.proc.returncode == 1
    assert "exited with code -9" in srv.log()
    for pid in engines:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
