"""PrefillAdder (scheduler/policy.py): which waiting requests join a prefill batch, and how much
of each, under the three budgets of its docstring: new tokens per batch (max_prefill_tokens, the
first request excepted when it cannot be split), request slots (max_running_requests) and KV
memory (available slots less the running requests' expected remaining tokens * new_token_ratio).
Expected values are worked out from those rules, not read back from the code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.scheduler.batch import prepare_extend
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.policy import NewTokenRatio, PrefillAdder, order_waiting
from nlcli.engine.scheduler.req import Req
from tests.test_scheduler_fakes import FakeAllocator, FakeReqToTokenPool

CONTEXT = 1000


def _mem(size=1000) -> KVMemory:
    runner = SimpleNamespace(req_to_token_pool=FakeReqToTokenPool(16, CONTEXT),
                             token_to_kv_pool_allocator=FakeAllocator(size),
                             device=torch.device("cpu"))
    return KVMemory(runner, disable_cache=False)


def _req(n, max_new=10, start=0, rid=None) -> Req:
    ids = list(range(start, start + n))
    return Req(rid or f"r{start}-{n}", ids, SamplingParams.from_dict({"max_new_tokens": max_new}))


def _adder(mem, running=(), prefill=10_000, chunk=-1, max_running=16, ratio=1.0, **kw):
    return PrefillAdder(mem, list(running), max_prefill_tokens=prefill,
                        chunked_prefill_size=chunk, max_running_requests=max_running,
                        new_token_ratio=ratio, context_len=CONTEXT, **kw)


def _fills(adder):
    return [len(r.fill_ids) - r.prefix_len for r in adder.admitted]


def test_prefill_token_budget():
    mem = _mem()
    adder = _adder(mem, prefill=100)
    reqs = [_req(40, start=0), _req(40, start=100), _req(40, start=200)]
    assert adder.add(reqs[0]) and adder.add(reqs[1])
    assert not adder.add(reqs[2])  # 120 > 100 and it may not be split (no chunking)
    assert adder.admitted == reqs[:2] and _fills(adder) == [40, 40]
    assert reqs[2].last_node is None and mem.counts().protected == 0  # refused: nothing locked


def test_first_request_may_exceed_the_budget_when_it_cannot_be_split():
    adder = _adder(_mem(), prefill=100)
    big = _req(300)
    assert adder.add(big) and adder.admitted == [big] and _fills(adder) == [300]
    assert not adder.add(_req(5, start=500))  # the budget is spent


def test_chunking_splits_at_chunk_size_and_stops_the_batch():
    adder = _adder(_mem(), prefill=1000, chunk=64)
    short, long_, after = _req(30, start=0), _req(200, start=100), _req(5, start=400)
    assert adder.add(short)
    assert not adder.add(long_)  # admitted as a chunk: nothing more joins this batch
    assert adder.chunked is long_ and long_.is_chunked and _fills(adder) == [30, 64]
    assert not adder.add(after) and adder.admitted == [short, long_]


def test_chunk_takes_what_is_left_of_the_budget():
    adder = _adder(_mem(), prefill=100, chunk=512)
    assert adder.add(_req(70, start=0))
    tail = _req(200, start=100)
    assert not adder.add(tail)
    assert adder.chunked is tail and _fills(adder) == [70, 30]


def test_request_slots():
    running = [_req(5, start=900 + i) for i in range(3)]
    adder = _adder(_mem(), running=running, max_running=5, ratio=0.0)
    reqs = [_req(5, start=10 * i) for i in range(4)]
    assert adder.add(reqs[0]) and adder.add(reqs[1])
    assert not adder.add(reqs[2])  # 3 running + 2 admitted = max_running_requests
    assert len(adder.admitted) == 2


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_memory_reserves_the_running_requests_future(ratio):
    # Running: 2 requests that may still generate 100 tokens each -> 200 * ratio reserved.
    running = [_req(10, max_new=100, start=900), _req(10, max_new=100, start=950)]
    mem = _mem(size=500)
    reserved = int(100 * ratio) * 2
    room = mem.available() - reserved
    adder = _adder(mem, running=running, ratio=ratio)
    # A new request needs its prompt plus its own future: 50 + 50 * ratio.
    need = 50 + int(50 * ratio)
    fit = room // need
    reqs = [_req(50, max_new=50, start=1000 + 100 * i) for i in range(fit + 1)]
    assert all(adder.add(r) for r in reqs[:fit])
    assert not adder.add(reqs[fit])
    assert len(adder.admitted) == fit and mem.counts().protected == 0


@pytest.mark.parametrize("clip", [30, 4096])
def test_clip_caps_each_requests_future(clip):
    # Running: 1 request that may still generate 300 tokens; new ones may generate 200 each.
    # Each future counts as min(future, clip) (SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION).
    running = [_req(10, max_new=300, start=900)]
    mem = _mem(size=600)
    room = mem.available() - min(300, clip)
    need = 50 + min(200, clip)
    fit = room // need
    adder = _adder(mem, running=running, clip_max_new_tokens=clip)
    reqs = [_req(50, max_new=200, start=1000 + 100 * i) for i in range(fit + 1)]
    assert all(adder.add(r) for r in reqs[:fit])
    assert not adder.add(reqs[fit])
    assert fit == (7 if clip == 30 else 1)


def test_alone_on_an_idle_engine_only_the_prompt_must_fit():
    mem = _mem(size=100)
    adder = _adder(mem)
    r = _req(90, max_new=500)  # its future (500) would never fit; decode retracts or stops
    assert adder.add(r) and _fills(adder) == [90]
    busy = _adder(_mem(size=100), running=[_req(1, max_new=1, start=900)], ratio=1.0)
    assert not busy.add(_req(90, max_new=500))  # not alone: prompt + future must fit


def test_cached_prefix_is_locked_and_not_counted_as_new_tokens():
    mem = _mem()
    first = _req(60)
    mem.lock_prefix(first, first.all_ids)
    first.fill_ids = first.all_ids
    prepare_extend(mem, [first])
    mem.release(first)
    adder = _adder(mem, prefill=20)
    again = Req("again", list(range(60)) + [7, 8, 9, 10, 11], first.sampling_params)
    assert adder.add(again)
    assert again.prefix_len == 60 and again.cached_tokens == 60 and _fills(adder) == [5]
    assert mem.counts().protected == 60


def test_continuing_chunk_keeps_its_place():
    mem = _mem()
    adder = _adder(mem, chunk=50)
    r = _req(120)
    adder.add(r)
    r.prefix_indices = torch.arange(50)  # as if the first chunk were cached and locked
    nxt = _adder(mem, chunk=50)
    assert not nxt.add_chunked(r) and nxt.chunked is r and _fills(nxt) == [50]
    last = _adder(mem, chunk=50)
    r.prefix_indices = torch.arange(100)
    assert last.add_chunked(r) and last.chunked is None and _fills(last) == [20]


def test_new_token_ratio_decays_and_jumps_after_retraction():
    ratio = NewTokenRatio(1.0)
    assert ratio.value == pytest.approx(0.7)
    for _ in range(10_000):
        ratio.decay()
    assert ratio.value == pytest.approx(0.1)  # the floor: 0.1 * conservativeness
    ratio.after_retraction()
    assert ratio.value == pytest.approx(1.0)


def test_lpm_orders_by_cached_prefix_then_arrival():
    mem = _mem()
    warm = _req(40)
    mem.lock_prefix(warm, warm.all_ids)
    warm.fill_ids = warm.all_ids
    prepare_extend(mem, [warm])
    mem.release(warm)
    cold_a, cold_b = _req(10, start=500), _req(10, start=600)
    hot = Req("hot", list(range(30)) + [999], warm.sampling_params)
    assert order_waiting([cold_a, hot, cold_b], "lpm", mem) == [hot, cold_a, cold_b]
    assert order_waiting([cold_a, hot, cold_b], "fcfs", mem) == [cold_a, hot, cold_b]


def test_sharers_of_an_uncached_prefix_are_held_behind_one_carrier():
    mem = _mem()
    adder = _adder(mem)
    head = list(range(100))  # shared, not cached
    carrier, sharer = Req("c", head + [500, 501], _req(1).sampling_params), \
        Req("s", head + [600], _req(1).sampling_params)
    other, short = _req(40, start=700), Req("h", head[:20] + [900], _req(1).sampling_params)
    assert adder.add(carrier) and adder.add(sharer) and adder.add(other) and adder.add(short)
    # The sharer would save 100 tokens by waiting a step; `short` only 20, below the threshold.
    assert adder.admitted == [carrier, other, short] and adder.held == [sharer]
    assert sharer.last_node is None and mem.counts().protected == 0


def test_sharers_of_the_chunked_request_under_way_are_held():
    mem = _mem()
    r = _req(300)
    r.prefix_indices = torch.arange(100)  # as if its first chunk were cached and locked
    adder = _adder(mem, chunk=512)
    assert adder.add_chunked(r)  # its last chunk: the queue may join this batch
    sharer = _req(250)  # the first 250 tokens of r's prompt; none cached in this tree
    assert adder.add(sharer) and adder.held == [sharer] and adder.admitted == [r]
