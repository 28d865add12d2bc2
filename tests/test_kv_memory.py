"""KVMemory (scheduler/cache.py) keeps the books: after every lock, extend, chunk and release,
free + evictable + protected + slots owned by live requests == pool size, rows are returned, and
what a request computed is what the radix cache then serves (checked slot by slot)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.scheduler.batch import prepare_decode, prepare_extend
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.req import Req
from tests.test_scheduler_fakes import FakeAllocator, FakeReqToTokenPool


def _mem(size=200, rows=8, disable=False) -> KVMemory:
    runner = SimpleNamespace(req_to_token_pool=FakeReqToTokenPool(rows, 64),
                             token_to_kv_pool_allocator=FakeAllocator(size),
                             device=torch.device("cpu"))
    return KVMemory(runner, disable)


def _req(ids, rid="r", **kw) -> Req:
    return Req(rid, ids, SamplingParams.from_dict({"max_new_tokens": 8}), **kw)


def _owned(reqs) -> int:
    """Slots a live request holds outside the tree: its K/V past the locked prefix."""
    return sum(r.kv_len - r.prefix_len for r in reqs if r.req_pool_idx is not None)


def _balanced(mem: KVMemory, live=()) -> bool:
    c = mem.counts()
    rows_held = sum(r.req_pool_idx is not None for r in live)
    for r in live:  # a row starts with its locked prefix, and every slot in it is allocated
        row = _kv_of(mem, r) if r.req_pool_idx is not None else []
        if row[: r.prefix_len] != r.prefix_indices.tolist()[: len(row)]:
            return False
        if not all(mem.allocator.is_held(s) for s in row):
            return False
    return (c.free + c.evictable + c.protected + _owned(live) == c.size
            and c.rows_free + rows_held == c.rows_total)


def _admit(mem: KVMemory, req: Req, take=None) -> None:
    """What PrefillAdder + prepare_extend do for one request: lock its prefix, fill, extend."""
    if req.req_pool_idx is None:
        mem.lock_prefix(req, req.all_ids)
    end = len(req.all_ids) if take is None else req.prefix_len + take
    req.fill_ids = req.all_ids[:end]
    prepare_extend(mem, [req])


def _kv_of(mem: KVMemory, req: Req) -> list[int]:
    return mem.req_to_token[req.req_pool_idx, : req.kv_len].tolist()


def test_release_caches_what_was_computed_and_next_request_reuses_it():
    mem = _mem()
    a = _req(list(range(10, 30)), "a")
    _admit(mem, a)
    slots = _kv_of(mem, a)
    assert _balanced(mem, [a]) and mem.used() == 20
    mem.release(a)
    assert _balanced(mem) and a.req_pool_idx is None and mem.counts().evictable == 20
    b = _req(list(range(10, 30)) + [99], "b")
    mem.lock_prefix(b, b.all_ids)
    assert b.prefix_indices.tolist() == slots  # the very slots a wrote
    assert mem.counts().protected == 20 and _balanced(mem, [b])
    mem.unlock_prefix(b)
    assert mem.counts().protected == 0 and _balanced(mem)


def test_lock_never_takes_the_last_token_nor_logprob_positions():
    mem = _mem()
    a = _req(list(range(10, 30)), "a")
    _admit(mem, a)
    mem.release(a)
    same = _req(list(range(10, 30)), "same")  # fully cached: the last token is recomputed
    mem.lock_prefix(same, same.all_ids)
    assert same.prefix_len == 19
    mem.unlock_prefix(same)
    lp = _req(list(range(10, 30)), "lp", return_logprob=True, logprob_start_len=5)
    mem.lock_prefix(lp, lp.all_ids)
    assert lp.prefix_len == 5  # positions from 5 on need their logits
    mem.unlock_prefix(lp)
    assert _balanced(mem)


def test_duplicate_computation_frees_the_copy():
    mem = _mem()
    a, b = _req(list(range(40, 60)), "a"), _req(list(range(40, 60)), "b")
    _admit(mem, a)
    _admit(mem, b)  # both missed the cache: two copies of the same K/V
    assert mem.used() == 40 and _balanced(mem, [a, b])
    mem.release(a)
    mem.release(b)
    c = mem.counts()
    assert c.evictable == 20 and c.free == c.size - 20 and _balanced(mem)


def test_cache_prefill_locks_each_chunk_as_the_prefix():
    mem = _mem()
    r = _req(list(range(100, 130)), "r")
    _admit(mem, r, take=12)
    mem.cache_prefill(r)
    assert r.prefix_len == 12 and mem.counts().protected == 12 and _balanced(mem, [r])
    _admit(mem, r, take=12)
    mem.cache_prefill(r)
    assert r.prefix_len == 24 and mem.counts().protected == 24 and _balanced(mem, [r])
    _admit(mem, r)  # the last chunk
    assert r.kv_len == 30 and _balanced(mem, [r])
    written = _kv_of(mem, r)
    mem.release(r)
    assert _balanced(mem) and mem.counts().protected == 0
    probe = _req(list(range(100, 130)) + [1], "p")
    mem.lock_prefix(probe, probe.all_ids)
    assert probe.prefix_indices.tolist() == written
    mem.unlock_prefix(probe)


def test_chunk_computed_twice_meanwhile_points_at_the_cached_copy():
    mem = _mem()
    prompt = list(range(100, 130))
    r = _req(prompt, "r")
    _admit(mem, r, take=12)
    mem.cache_prefill(r)
    a = _req(prompt, "a")  # the same prompt, whole, while r is part-way
    _admit(mem, a)
    assert a.prefix_len == 12
    mem.release(a)
    _admit(mem, r, take=12)  # computes 12..24 again: a's copy is already cached
    mem.cache_prefill(r)
    assert r.prefix_len == 24 and _balanced(mem, [r])
    _admit(mem, r)
    mem.release(r)
    c = mem.counts()
    assert c.evictable == 30 and c.free == c.size - 30 and _balanced(mem)


def test_disabled_cache_frees_everything():
    mem = _mem(disable=True)
    r = _req(list(range(30)), "r")
    _admit(mem, r, take=10)
    mem.cache_prefill(r)
    assert r.prefix_len == 10 and mem.counts().protected == 0
    _admit(mem, r)
    mem.release(r)
    c = mem.counts()
    assert c.free == c.size and c.evictable == 0 and _balanced(mem)


def test_random_requests_keep_the_books_and_the_cache_honest():
    """Random prompts over a small alphabet (lots of sharing), chunked or whole, decoded a few
    steps and released in random order, with evictions forced by a small pool. Like the fake
    runner's KV buffer, `written` records for each slot which token prefix was last written
    there; every slot the cache serves must hold exactly the prefix it is served for."""
    rng = random.Random(1)
    mem = _mem(size=120, rows=6)
    live: list[Req] = []
    written: dict[int, tuple] = {}
    served = 0
    for step in range(400):
        if live and (len(live) >= 5 or rng.random() < 0.4):
            mem.release(live.pop(rng.randrange(len(live))))
        elif any(r.is_chunked for r in live) and rng.random() < 0.3:
            r = next(r for r in live if r.is_chunked)
            if mem.available() >= len(r.all_ids) - r.kv_len:
                _admit(mem, r, take=rng.choice([None, 4, 9]))
                if r.is_chunked or rng.random() < 0.5:
                    mem.cache_prefill(r)
        elif live and rng.random() < 0.5:
            growing = [r for r in live if not r.is_chunked and r.kv_len]
            if growing and mem.available() >= len(growing):
                for r in growing:
                    r.output_ids.append(rng.randrange(3))
                prepare_decode(mem, growing)
        else:
            ids = [rng.randrange(3) for _ in range(rng.randint(2, 25))]
            if mem.available() < len(ids) or mem.counts().rows_free == 0:
                continue
            r = _req(ids, f"r{step}")
            _admit(mem, r, take=rng.choice([None, 4, 9]))
            if r.is_chunked or rng.random() < 0.5:  # a whole prefill is cached at once too
                mem.cache_prefill(r)
            live.append(r)
        for r in live:
            for i, slot in enumerate(_kv_of(mem, r)):
                written[slot] = tuple(r.all_ids[: i + 1])
        assert _balanced(mem, live), step
        probe = [rng.randrange(3) for _ in range(rng.randint(1, 20))]
        got = mem.tree.match_prefix(probe)[0].tolist()
        assert [written.get(s) for s in got] == [tuple(probe[: i + 1]) for i in range(len(got))]
        served += len(got)
    assert served > 500  # the cache was really exercised
    for r in live:
        mem.release(r)
    c = mem.counts()
    assert c.protected == 0 and c.free + c.evictable == c.size and _balanced(mem)
    mem.flush()
    assert mem.counts().free == c.size


def test_whole_prefill_is_cached_before_its_request_finishes():
    mem = _mem()
    prompt = list(range(100, 130))
    r = _req(prompt, "r")
    _admit(mem, r)
    mem.cache_prefill(r)
    assert r.prefix_len == 30 and mem.counts().protected == 30 and _balanced(mem, [r])
    r.output_ids.append(7)
    prepare_decode(mem, [r])
    twin = _req(prompt, "t")  # computes the same prompt meanwhile: its copy is a duplicate
    _admit(mem, twin)
    assert twin.prefix_len == 29
    mem.cache_prefill(twin)
    assert _kv_of(mem, twin) == _kv_of(mem, r)[:30] and _balanced(mem, [r, twin])
    mem.release(twin)
    mem.release(r)
    c = mem.counts()
    assert c.protected == 0 and c.evictable == 31 and _balanced(mem)
