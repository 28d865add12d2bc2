"""ApproxRadixTree: what one engine group probably has in its prefix cache, for cache-aware
routing.

It records the token ids of every prompt routed to the group (not what the engine really kept:
the engine evicts on its own, so the tree is an approximation, as in sglang-router). Edges hold
runs of token ids (a compressed radix tree). Its size is bounded: past `max_tokens` the least
recently used leaves are evicted, so a long-running server's trees do not grow without end.
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

# After an eviction the tree holds at most this share of max_tokens, so evictions (a walk over
# every leaf) happen once per many inserts rather than on each one.
EVICT_TO = 0.75


class _Node:
    __slots__ = ("key", "children", "parent", "last_access")

    def __init__(self, key: tuple[int, ...], parent: Optional["_Node"], now: int):
        self.key = key  # the token ids on the edge into this node
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_access = now


def _common(key: tuple[int, ...], ids: Sequence[int], start: int) -> int:
    """How many leading tokens of `key` equal ids[start:]."""
    n = min(len(key), len(ids) - start)
    i = 0
    while i < n and key[i] == ids[start + i]:
        i += 1
    return i


class ApproxRadixTree:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._clock = 0  # a counter, not wall time: ties and tests stay deterministic
        self.root = _Node((), None, 0)
        self.size = 0  # tokens held on all edges

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match(self, ids: Sequence[int]) -> int:
        """The length of the longest prefix of `ids` in the tree (touching what it matched)."""
        node, i, now = self.root, 0, self._tick()
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            n = _common(child.key, ids, i)
            child.last_access = now
            i += n
            if n < len(child.key):
                break
            node = child
        return i

    def insert(self, ids: Sequence[int]) -> None:
        """Record `ids` (a prompt routed to the group), then evict if over the bound."""
        node, i, now = self.root, 0, self._tick()
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                node.children[ids[i]] = _Node(tuple(ids[i:]), node, now)
                self.size += len(ids) - i
                break
            n = _common(child.key, ids, i)
            if n < len(child.key):  # split the edge where `ids` leaves it
                mid = _Node(child.key[:n], node, now)
                child.key, child.parent = child.key[n:], mid
                mid.children[child.key[0]] = child
                node.children[ids[i]] = child = mid
            child.last_access = now
            i += n
            node = child
        if self.size > self.max_tokens:
            self.evict(int(self.max_tokens * EVICT_TO))

    def evict(self, keep: int) -> None:
        """Drop least recently used leaves until at most `keep` tokens remain. A node is touched
        whenever a descendant is, so a leaf is never newer than the path above it."""
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        while self.size > keep and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _leaves(self) -> list[_Node]:
        out, todo = [], list(self.root.children.values())
        while todo:
            node = todo.pop()
            if node.children:
                todo.extend(node.children.values())
            else:
                out.append(node)
        return out

    def clear(self) -> None:
        self.root, self.size = _Node((), None, self._tick()), 0
