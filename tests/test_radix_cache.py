"""RadixCache: matching, insertion, lock/unlock sizes, LRU eviction, against a brute-force oracle."""

import random

import pytest
import torch

from nlcli.engine.mem_cache.radix_cache import RadixCache
from tests.test_scheduler_fakes import FakeAllocator


def _insert_fresh(tree: RadixCache, alloc: FakeAllocator, ids: list[int]) -> torch.Tensor:
    """Insert `ids` as a request would: own slots for everything, free the duplicates."""
    slots = alloc.alloc(len(ids))
    shared = tree.insert(ids, slots)
    alloc.free(slots[:shared])
    return slots


def _books(tree: RadixCache, alloc: FakeAllocator) -> bool:
    return alloc.available_size() + tree.evictable_size() + tree.protected_size() == alloc.size


def test_match_returns_slots_of_longest_prefix_and_splits():
    alloc = FakeAllocator(100)
    tree = RadixCache(alloc)
    a = _insert_fresh(tree, alloc, [1, 2, 3, 4, 5])
    prefix, node = tree.match_prefix([1, 2, 3, 9])
    assert prefix.tolist() == a[:3].tolist()
    assert node.key == [1, 2, 3]  # the edge was split at the divergence
    assert tree.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == a.tolist()
    assert tree.match_prefix([7])[0].numel() == 0
    assert tree.total_size() == 5 and _books(tree, alloc)


def test_insert_reports_shared_length_and_keeps_old_slots():
    alloc = FakeAllocator(100)
    tree = RadixCache(alloc)
    a = _insert_fresh(tree, alloc, [1, 2, 3, 4])
    b = alloc.alloc(6)
    assert tree.insert([1, 2, 3, 7, 8, 9], b) == 3
    alloc.free(b[:3])
    assert tree.match_prefix([1, 2, 3, 7, 8, 9])[0].tolist() == a[:3].tolist() + b[3:].tolist()
    assert tree.total_size() == 7 and tree.evictable_size() == 7 and _books(tree, alloc)


def test_lock_moves_sizes_and_blocks_eviction():
    alloc = FakeAllocator(100)
    tree = RadixCache(alloc)
    _insert_fresh(tree, alloc, [1, 2, 3, 4])
    _insert_fresh(tree, alloc, [1, 2, 5, 6, 7])
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(node)
    assert tree.protected_size() == 4 and tree.evictable_size() == 3
    assert tree.evict(100) == 3  # only the unlocked branch goes
    assert tree.match_prefix([1, 2, 5])[0].numel() == 2
    tree.inc_lock_ref(node)
    tree.dec_lock_ref(node)
    assert tree.protected_size() == 4  # still held by the first lock
    tree.dec_lock_ref(node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 4 and _books(tree, alloc)
    with pytest.raises(RuntimeError):
        tree.dec_lock_ref(node)


def test_split_of_locked_node_keeps_lock_on_both_halves():
    alloc = FakeAllocator(100)
    tree = RadixCache(alloc)
    _insert_fresh(tree, alloc, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(node)
    tree.match_prefix([1, 2, 9])  # splits the locked edge
    assert tree.evict(100) == 0 and tree.protected_size() == 4
    tree.dec_lock_ref(node)
    assert tree.evictable_size() == 4 and tree.evict(100) == 4 and _books(tree, alloc)


def test_eviction_is_lru_and_cascades_to_parents():
    alloc = FakeAllocator(100)
    tree = RadixCache(alloc)
    _insert_fresh(tree, alloc, [1, 2, 3])
    _insert_fresh(tree, alloc, [1, 2, 4])
    _insert_fresh(tree, alloc, [5, 6])
    tree.match_prefix([1, 2, 3])  # most recent
    assert tree.evict(1) == 1  # [4] is the oldest leaf
    assert tree.match_prefix([1, 2, 4])[0].numel() == 2
    assert tree.evict(1) == 2  # then [5, 6]
    assert tree.match_prefix([5, 6])[0].numel() == 0
    assert tree.match_prefix([1, 2, 3])[0].numel() == 3
    assert tree.evict(10) == 3  # [3], then its parent [1, 2] becomes a leaf and goes too
    assert tree.total_size() == 0 and alloc.available_size() == 100


def test_disabled_cache_matches_nothing():
    alloc = FakeAllocator(10)
    tree = RadixCache(alloc, disable=True)
    assert tree.insert([1, 2], torch.tensor([1, 2])) == 0
    assert tree.match_prefix([1, 2])[0].numel() == 0 and tree.total_size() == 0


def _oracle_match(oracle: dict, ids: list[int]) -> list[int]:
    """Slots of the longest cached prefix of `ids`, from the {prefix tuple: slot} oracle."""
    out = []
    for i in range(len(ids)):
        slot = oracle.get(tuple(ids[: i + 1]))
        if slot is None:
            break
        out.append(slot)
    return out


def test_random_workload_against_oracle():
    """Random inserts/locks/evictions against a real {token-prefix tuple: slot} dict: every
    match_prefix equals the oracle's longest prefix, inserts report the oracle's shared length,
    evictions free exactly the entries that leave the oracle (never a locked one), and the oracle
    stays prefix-closed (only leaves are evicted)."""
    rng = random.Random(0)
    alloc = FakeAllocator(400)
    tree = RadixCache(alloc)
    oracle: dict[tuple, int] = {}
    locks: list[tuple] = []  # (node, the locked prefix's ids)

    def drop_freed() -> int:
        gone = [k for k, slot in oracle.items() if not alloc.is_held(slot)]
        for k in gone:
            del oracle[k]
        return len(gone)

    for _ in range(600):
        ids = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        op = rng.random()
        if op < 0.5 and alloc.available_size() + tree.evictable_size() >= len(ids):
            if alloc.available_size() < len(ids):
                assert tree.evict(len(ids) - alloc.available_size()) == drop_freed()
            had = _oracle_match(oracle, ids)
            slots = alloc.alloc(len(ids))
            shared = tree.insert(ids, slots)
            alloc.free(slots[:shared])
            assert shared == len(had)
            for i in range(shared, len(ids)):
                oracle[tuple(ids[: i + 1])] = int(slots[i])
        elif op < 0.7:
            _, node = tree.match_prefix(ids)
            tree.inc_lock_ref(node)
            locks.append((node, ids[: len(_oracle_match(oracle, ids))]))
        elif op < 0.85 and locks:
            tree.dec_lock_ref(locks.pop(rng.randrange(len(locks)))[0])
        else:
            assert tree.evict(rng.randint(1, 20)) == drop_freed()
        assert _books(tree, alloc)
        assert tree.total_size() == len(oracle)
        assert all(k[:-1] in oracle for k in oracle if len(k) > 1)  # prefix-closed
        for _, held in locks:  # a locked prefix is never evicted
            assert all(tuple(held[: i + 1]) in oracle for i in range(len(held)))
        probe = ids if rng.random() < 0.5 else [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        prefix, node = tree.match_prefix(probe)
        assert prefix.tolist() == _oracle_match(oracle, probe)
        path, cur = [], node
        while cur is not tree.root:
            path = cur.key + path
            cur = cur.parent
        assert path == probe[: prefix.numel()]
    for node, _ in locks:
        tree.dec_lock_ref(node)
    tree.evict_all()
    assert alloc.available_size() == alloc.size and tree.total_size() == 0
