"""Request deadlines, the queue cap and the admission clip (scheduler/timeouts.py, policy.py) on
the paging fake runner: expired requests end with SGLang's 503 abort and give back their KV (the
strict books check after every drain), the rest still equal the unpaged reference."""

from __future__ import annotations

import pytest

from nlcli.engine.args import ServerArgs
from nlcli.engine.scheduler.timeouts import RequestLimits
from tests.test_scheduler import Harness, _prompts
from tests.test_scheduler_fakes import greedy, reference_greedy

WAIT = {"type": "abort", "message": "Request waiting timeout reached.", "status_code": 503}
RUN = {"type": "abort", "message": "Request running timeout reached.", "status_code": 503}


@pytest.fixture(autouse=True)
def strict_books(monkeypatch):
    monkeypatch.setenv("NL_TEST_STRICT_LEAK", "1")
    for name in ("SGLANG_REQ_WAITING_TIMEOUT", "SGLANG_REQ_RUNNING_TIMEOUT",
                 "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION"):
        monkeypatch.delenv(name, raising=False)


def _req(h, rid):
    return h.sched.outputs.find(rid)


def test_waiting_timeout_aborts_queued_request_with_503():
    h = Harness(max_running_requests=1, waiting_timeout=30)
    a, b = _prompts(2, seed=11)
    h.submit("a", a, greedy(20, ignore_eos=True))
    h.submit("b", b, greedy(20, ignore_eos=True))
    h.sched.step()  # "a" is prefilled; "b" waits for a request slot
    _req(h, "b").queued_at -= 31  # as if 31 s had passed
    h.sched.step()
    h._collect()
    assert h.final["b"]["reason"] == WAIT and h.ids.get("b", []) == []
    assert not h.sched.waiting
    h.drain()
    assert h.ids["a"] == reference_greedy(a, 20, ignore_eos=True)


def test_running_timeout_aborts_running_request_and_frees_its_kv():
    h = Harness(running_timeout=30)
    a, b = _prompts(2, seed=12)
    h.submit("a", a, greedy(40, ignore_eos=True))
    h.submit("b", b, greedy(40, ignore_eos=True))
    for _ in range(5):
        h.sched.step()
    used_before = h.sched.mem.used()
    _req(h, "a").started_at -= 31
    h.sched.step()
    h._collect()
    assert h.final["a"]["reason"] == RUN
    # Its slots left with it (only "b" holds KV now, one more token than before).
    assert h.sched.mem.used() < used_before
    assert 0 < len(h.ids["a"]) < 40
    assert h.ids["a"] == reference_greedy(a, 40, ignore_eos=True)[:len(h.ids["a"])]
    h.drain()
    assert h.ids["b"] == reference_greedy(b, 40, ignore_eos=True)


def test_timeouts_off_by_default_and_read_from_sglang_env(monkeypatch):
    limits = RequestLimits(ServerArgs())
    assert limits.waiting_timeout is None and limits.running_timeout is None
    assert not limits.any_timeout and limits.clip_max_new_tokens == 4096
    monkeypatch.setenv("SGLANG_REQ_WAITING_TIMEOUT", "7.5")
    monkeypatch.setenv("SGLANG_REQ_RUNNING_TIMEOUT", "-1")  # SGLang's "off"
    monkeypatch.setenv("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", "256")
    limits = RequestLimits(ServerArgs())
    assert limits.waiting_timeout == 7.5 and limits.running_timeout is None
    assert limits.clip_max_new_tokens == 256
    limits = RequestLimits(ServerArgs(waiting_timeout=2.0, clip_max_new_tokens_estimation=64))
    assert limits.waiting_timeout == 2.0 and limits.clip_max_new_tokens == 64  # the flag wins


def test_max_queued_requests_refuses_with_503():
    h = Harness(max_queued_requests=2)
    prompts = _prompts(3, seed=13)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(5, ignore_eos=True))
    h._collect()
    assert h.final["2"]["reason"] == {"type": "abort", "message": "The request queue is full.",
                                      "status_code": 503}
    h.drain()
    for i in (0, 1):
        assert h.ids[str(i)] == reference_greedy(prompts[i], 5, ignore_eos=True)
    h.submit("3", prompts[2], greedy(5, ignore_eos=True))  # room again once the queue drained
    h.drain()
    assert h.ids["3"] == reference_greedy(prompts[2], 5, ignore_eos=True)


@pytest.mark.parametrize("clip,together", [(None, False), (16, True)])
def test_clip_lets_requests_without_max_tokens_run_together(clip, together):
    """No max_tokens: each request may grow to the context (512). Reserving all of it (clip off,
    as 4096 > 512) admits only a few of 8 into a 1024-slot pool; clipped, all 8 start at once,
    and retraction keeps the pool from overflowing: outputs still equal the reference."""
    h = Harness(pool_size=1024, clip_max_new_tokens_estimation=clip)
    prompts = _prompts(8, seed=14, lo=20, hi=30)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(None, ignore_eos=True))
    h.drain()
    first = h.runner.forward_calls[0].batch_size
    assert (first == 8) if together else (first < 8)
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 512 - len(p), ignore_eos=True)
    if together:
        assert h.sched.books.num_retractions > 0
