"""The data-parallel router without servers: the approximate radix tree (matches, splits, LRU
eviction against a brute-force reference), each --load-balance-method policy, the merge of the
groups' control replies and heartbeats, and the flag's spellings."""

from __future__ import annotations

import random

import pytest

from nlcli.engine.api.dp import router as router_mod
from nlcli.engine.api.dp.approx_radix import ApproxRadixTree
from nlcli.engine.api.dp.fan_in import ReplyGather, merge_heartbeats
from nlcli.engine.api.dp.router import (CacheAwareRouter, Router, ShortestQueueRouter, balanced,
                                        make_router)
from nlcli.engine.args import ServerArgs
from nlcli.engine.io_struct import (FlushCacheReq, FlushCacheReqOutput, GenerationControlOutput,
                                    Heartbeat, UpdateWeightReqOutput)


def _longest_prefix(seqs: list[list[int]], ids: list[int]) -> int:
    best = 0
    for s in seqs:
        n = 0
        while n < min(len(s), len(ids)) and s[n] == ids[n]:
            n += 1
        best = max(best, n)
    return best


def test_tree_matches_like_a_brute_force_search():
    rng = random.Random(0)
    tree, seen = ApproxRadixTree(max_tokens=10**9), []
    for _ in range(300):
        base = rng.choice(seen) if seen and rng.random() < 0.6 else []
        ids = base[:rng.randint(0, len(base))] + [rng.randint(0, 5) for _ in range(rng.randint(0, 12))]
        probe = ids[:rng.randint(0, len(ids))] + [rng.randint(0, 5)]
        assert tree.match(probe) == _longest_prefix(seen, probe)
        tree.insert(ids)
        seen.append(ids)
        assert tree.match(ids) == len(ids)
    # The size counts every distinct prefix token once (a trie's node count).
    assert tree.size == len({tuple(s[:i + 1]) for s in seen for i in range(len(s))})


def test_tree_evicts_least_recently_used_prompts_first():
    tree = ApproxRadixTree(max_tokens=30)
    a, b, c = [1] * 10, [2] * 10, [3] * 10
    for ids in (a, b, c):
        tree.insert(ids)
    tree.match(a)  # a is now newer than b
    tree.insert([4] * 10)  # over the bound: evicts down to EVICT_TO of it, oldest first
    assert tree.size <= 30
    assert tree.match(b) == 0 and tree.match(a) == 10 and tree.match([4] * 10) == 10
    # A shared stem stays while one of its branches is still in use.
    tree = ApproxRadixTree(max_tokens=10**6)
    tree.insert([7] * 8 + [1] * 8)
    tree.insert([7] * 8 + [2] * 8)
    tree.match([7] * 8 + [2] * 8)
    tree.evict(16)
    assert tree.size == 16
    assert tree.match([7] * 8 + [2] * 8) == 16 and tree.match([7] * 8 + [1] * 8) == 8
    tree.clear()
    assert tree.size == 0 and tree.match([7] * 8) == 0


def test_round_robin_and_shortest_queue():
    rr = Router(3)
    assert [rr.choose([1], [9, 0, 0]) for _ in range(5)] == [0, 1, 2, 0, 1]
    sq = ShortestQueueRouter(3)
    assert sq.choose([1], [2, 1, 1]) == 1 and sq.choose([1], [0, 1, 0]) == 0


def test_cache_aware_follows_the_prefix_while_balanced():
    r = CacheAwareRouter(2)
    p, q = list(range(100, 140)), list(range(500, 540))
    assert r.choose(p + [1], [0, 0]) == 0
    assert r.choose(q + [1], [0, 0]) == 1  # no match: the idlest, then the emptier tree
    for tail in range(2, 6):  # balanced enough: each prefix stays with its group
        assert r.choose(p + [tail], [3, 0]) == 0
        assert r.choose(q + [tail], [0, 3]) == 1
    # A short match (not over CACHE_THRESHOLD of the prompt) goes to the shortest queue.
    assert r.choose(p[:5] + list(range(900, 960)), [1, 0]) == 1


def test_cache_aware_falls_back_to_the_shortest_queue_when_unbalanced(monkeypatch):
    monkeypatch.setattr(router_mod, "BALANCE_ABS_THRESHOLD", 4)
    r = CacheAwareRouter(2)
    p = list(range(100, 140))
    assert r.choose(p, [0, 0]) == 0
    assert not balanced([10, 1]) and balanced([5, 4]) and balanced([6, 5])
    assert r.choose(p + [1], [5, 4]) == 0  # balanced: the cached group, though busier
    assert r.choose(p + [2], [10, 1]) == 1  # unbalanced: the idle one
    r.forget()
    assert r.trees[0].size == 0 and r.trees[1].size == 0


def test_make_router_names():
    assert type(make_router("auto", 2)) is Router  # SGLang's default resolves to round_robin
    assert type(make_router("total_requests", 2)) is ShortestQueueRouter
    assert type(make_router("cache_aware", 2)) is CacheAwareRouter
    with pytest.raises(ValueError, match="total_tokens"):
        make_router("total_tokens", 2)


def test_load_balance_flag_refuses_what_nl_does_not_implement():
    assert ServerArgs(dp_size=2, load_balance_method="cache_aware").refused_flags() == []
    refused = ServerArgs(load_balance_method="follow_bootstrap_room").refused_flags()
    assert len(refused) == 1 and refused[0].startswith("--load-balance-method follow_bootstrap_room")
    assert ServerArgs(dp_size=0).refused_flags() == ["--dp-size 0 (must be at least 1)"]


def test_replies_merge_once_every_group_answered():
    g = ReplyGather(2)
    assert g.add(1, FlushCacheReqOutput(success=True)) is None
    assert g.add(0, FlushCacheReqOutput(success=False)) == FlushCacheReqOutput(success=False)
    ok = UpdateWeightReqOutput(True, "ok", "/m", "auto")
    bad = UpdateWeightReqOutput(False, "no such file", "/old", "auto")
    g.add(0, ok)
    merged = g.add(1, bad)
    assert not merged.success and merged.message == "DP group 1: no such file"
    g.add(0, GenerationControlOutput(True, 2))
    assert g.add(1, GenerationControlOutput(True, 3)) == GenerationControlOutput(True, 5)
    # A reply left over from a request that timed out is not merged with the next one's.
    g.add(0, FlushCacheReqOutput(success=True))
    g.expect(FlushCacheReq())
    assert g.add(1, FlushCacheReqOutput(success=True)) is None


def test_heartbeats_add_counts_and_average_shares():
    m = merge_heartbeats([Heartbeat(num_running_reqs=2, token_usage=0.2, cache_hit_rate=0.5),
                          Heartbeat(num_running_reqs=3, token_usage=0.4, cache_hit_rate=0.0)])
    assert m.num_running_reqs == 5
    assert m.token_usage == pytest.approx(0.3) and m.cache_hit_rate == pytest.approx(0.25)
