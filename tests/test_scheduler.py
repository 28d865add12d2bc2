"""Scheduler against the paging fake runner: outputs equal the unpaged reference under batching,
prefix reuse, chunked prefill, retraction, aborts and flushes, and the books always balance."""

import random

import pytest

from nlcli.engine.args import ServerArgs
from nlcli.engine.io_struct import AbortReq, FlushCacheReq, FlushCacheReqOutput, TokenizedGenerateReqInput
from nlcli.engine.scheduler.books import MemoryLeakError
from nlcli.engine.scheduler.scheduler import Scheduler
from tests.test_scheduler_fakes import EOS_ID, FakeModelRunner, greedy, next_token, reference_greedy


@pytest.fixture(autouse=True)
def strict_books(monkeypatch):
    monkeypatch.setenv("NL_TEST_STRICT_LEAK", "1")


class Harness:
    def __init__(self, pool_size=4096, rows=64, context_len=512, runner=None, **args):
        self.runner = runner or FakeModelRunner(pool_size=pool_size, rows=rows,
                                                context_len=context_len)
        self.msgs = []
        self.sched = Scheduler(ServerArgs(**args), self.runner, self.msgs.append)
        self.ids: dict[str, list[int]] = {}
        self.final: dict[str, dict] = {}

    def submit(self, rid, prompt, params):
        self.sched.handle(TokenizedGenerateReqInput(rid, list(prompt), params))

    def drain(self, max_steps=100000):
        steps = 0
        while self.sched.step():
            steps += 1
            self._collect()
            assert steps < max_steps
        self._collect()
        self.sched.books.check()
        return steps

    def _collect(self):
        for m in self.msgs:
            if hasattr(m, "rids"):
                for i, rid in enumerate(m.rids):
                    self.ids.setdefault(rid, []).extend(m.new_token_ids[i])
                    if m.finished_reasons[i] is not None:
                        self.final[rid] = dict(reason=m.finished_reasons[i], prompt=m.prompt_tokens[i],
                                               completion=m.completion_tokens[i], cached=m.cached_tokens[i])
        self.msgs.clear()


def _prompts(n, seed=0, lo=5, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_concurrent_requests_equal_each_alone():
    h = Harness(max_prefill_tokens=120)
    prompts = _prompts(32)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(24))
    h.drain()
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 24)
        assert h.final[str(i)]["completion"] == len(h.ids[str(i)])
    # Budget respected, and requests really were batched together.
    extends = [b for b in h.runner.forward_calls if b.forward_mode.value == "extend"]
    assert all(b.num_tokens <= 120 for b in extends) and max(b.batch_size for b in extends) > 1
    assert max(b.batch_size for b in h.runner.forward_calls) > 8


def test_finish_reasons():
    h = Harness()
    p = _prompts(1, seed=3)[0]
    ref = reference_greedy(p, 200)
    assert ref[-1] == EOS_ID, "pick a seed whose continuation hits EOS"
    h.submit("eos", p, greedy(200))
    h.submit("len", p, greedy(3))
    h.submit("ign", p, greedy(len(ref) + 2, ignore_eos=True))
    h.submit("stop", p, greedy(200, stop_token_ids=[ref[1]]))
    h.submit("zero", p, greedy(0))
    h.drain()
    assert h.final["eos"]["reason"] == {"type": "stop", "matched": EOS_ID} and h.ids["eos"] == ref
    assert h.final["len"]["reason"] == {"type": "length", "length": 3}
    assert h.final["ign"]["reason"]["type"] == "length"
    assert h.ids["ign"] == reference_greedy(p, len(ref) + 2, ignore_eos=True)
    assert h.final["stop"]["reason"] == {"type": "stop", "matched": ref[1]}
    assert h.ids["zero"] == [] and h.final["zero"]["reason"] == {"type": "length", "length": 0}


def test_repeat_prompt_is_served_from_cache():
    h = Harness()
    p = _prompts(1, lo=40, hi=40)[0]
    h.submit("a", p, greedy(8))
    h.drain()
    h.submit("b", p, greedy(8))
    h.drain()
    assert h.final["a"]["cached"] == 0 and h.final["b"]["cached"] == len(p) - 1
    assert h.ids["a"] == h.ids["b"]
    h.sched.handle(FlushCacheReq())
    assert isinstance(h.msgs[-1], FlushCacheReqOutput) and h.msgs[-1].success
    h.submit("c", p, greedy(8))
    h.drain()
    assert h.final["c"]["cached"] == 0


def test_flush_refused_while_busy():
    h = Harness()
    h.submit("a", [40, 41, 42], greedy(5))
    h.sched.handle(FlushCacheReq())
    assert h.msgs[-1].success is False
    h.drain()


def test_chunked_prefill_matches_reference():
    h = Harness(chunked_prefill_size=16, max_prefill_tokens=40)
    prompts = _prompts(4, seed=1, lo=50, hi=90)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(10))
    h.drain()
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 10)
    extends = [b for b in h.runner.forward_calls if b.forward_mode.value == "extend"]
    assert all(b.num_tokens <= 40 for b in extends)
    assert max(e for b in extends for e in b.extend_lens_cpu) <= 16


def test_small_pool_retracts_and_resumes_identically():
    prompts = _prompts(8, seed=2, lo=20, hi=30)
    # Room for roughly two requests at a time; each needs ~30 prompt + 40 output tokens.
    h = Harness(pool_size=150)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(40, ignore_eos=True))
    h.drain()
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 40, ignore_eos=True)
    assert h.sched.books.num_retractions > 0


def test_forced_retraction_is_deterministic(monkeypatch):
    monkeypatch.setenv("NL_TEST_RETRACT", "1")
    h = Harness()
    prompts = _prompts(10, seed=4)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(30, ignore_eos=True))
    h.drain()
    assert h.sched.books.num_retractions >= 5
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 30, ignore_eos=True)


def test_max_running_requests_caps_decode_batch():
    h = Harness(max_running_requests=3)
    for i, p in enumerate(_prompts(9, seed=5)):
        h.submit(str(i), p, greedy(6, ignore_eos=True))
    h.drain()
    assert max(b.batch_size for b in h.runner.forward_calls) <= 3
    assert len(h.final) == 9


def test_aborts_free_memory_within_one_step():
    h = Harness(max_running_requests=2)
    for i, p in enumerate(_prompts(4, seed=6)):
        h.submit(str(i), p, greedy(50, ignore_eos=True))
    h.sched.step()
    h.sched.step()
    h.sched.handle(AbortReq(rid="0", message="client went away"))
    h.sched.handle(AbortReq(rid="3"))  # still queued
    h.sched.handle(AbortReq(rid="nope"))  # unknown ids are ignored
    h.sched.step()
    h._collect()
    assert h.final["0"]["reason"] == {"type": "abort", "message": "client went away"}
    assert h.final["3"]["reason"] == {"type": "abort", "message": "Abort in waiting queue"}
    h.sched.handle(AbortReq(abort_all=True))
    h.drain()
    assert {v["reason"]["type"] for v in h.final.values()} == {"abort"} and len(h.final) == 4


def test_lpm_prefers_longest_cached_prefix():
    h = Harness(max_running_requests=1, schedule_policy="lpm")
    shared = list(range(40, 100))
    h.submit("warm", shared + [33], greedy(1))
    h.drain()
    h.submit("cold", list(range(100, 120)), greedy(1))
    h.submit("hot", shared + [34], greedy(1))
    h.sched.step()
    first = h.runner.forward_calls[-1]
    assert first.prefix_lens_cpu == [len(shared)]  # "hot" went first despite arriving later
    h.drain()


def test_disable_radix_cache_has_no_hits_and_no_leak():
    h = Harness(disable_radix_cache=True, chunked_prefill_size=8)
    p = _prompts(1, lo=30, hi=30)[0]
    h.submit("a", p, greedy(5))
    h.drain()
    h.submit("b", p, greedy(5))
    h.drain()
    assert h.final["b"]["cached"] == 0 and h.ids["a"] == h.ids["b"] == reference_greedy(p, 5)


def test_books_check_raises_on_leak():
    h = Harness()
    h.runner.token_to_kv_pool_allocator.alloc(3)  # slots nobody accounts for
    with pytest.raises(MemoryLeakError):
        h.sched.books.check()


def test_next_token_oracle_depends_on_whole_context():
    # Guards the oracle itself: a single changed early token must change the continuation.
    a, b = [50] * 30, [51] + [50] * 29
    assert [next_token(a + [i]) for i in range(5)] != [next_token(b + [i]) for i in range(5)]
