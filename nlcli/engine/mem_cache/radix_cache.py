"""RadixCache: the prefix tree that maps token-id prefixes to the KV slots already holding them.

Token-level (page size 1). Each edge carries a run of token ids (`key`) and the KV slots of those
tokens (`value`). Requests lock the path they use (`lock_ref`), so only unlocked leaves are evicted,
least recently used first. Slots are handed back to the token_to_kv allocator on eviction.

Sizes are kept as running totals: `evictable_size` (slots in unlocked nodes) and `protected_size`
(slots in locked nodes); the scheduler's books check relies on them.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Optional, Sequence

import torch

_EMPTY = torch.empty((0,), dtype=torch.int64)
_clock = itertools.count()  # monotone access stamps; time.monotonic ties on fast machines


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: Optional["TreeNode"] = None):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = []
        self.value: torch.Tensor = _EMPTY
        self.lock_ref = 0
        self.last_access = next(_clock)

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access < other.last_access


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case (a whole edge matches), compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, token_to_kv_pool_allocator, disable: bool = False):
        self.allocator = token_to_kv_pool_allocator
        self.disable = disable
        self.reset()

    # ---- bookkeeping -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every node without freeing slots (callers evict first to hand them back)."""
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    # ---- lookup ------------------------------------------------------------------------------
    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """KV slots of the longest cached prefix of `key`, and the node where it ends.

        A partial match inside an edge splits that edge, so the returned node covers the prefix
        exactly and can be locked on its own.
        """
        if self.disable or not key:
            return _EMPTY, self.root
        values: list[torch.Tensor] = []
        node = self.root
        stamp = next(_clock)
        node.last_access = stamp
        i = 0
        while i < len(key) and key[i] in node.children:
            child = node.children[key[i]]
            child.last_access = stamp
            n = _common_len(child.key, key[i:])
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node = child
            i += n
        if not values:
            return _EMPTY, self.root
        return torch.cat(values), node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child`'s edge after n tokens; returns the new upper node."""
        upper = TreeNode(child.parent)
        upper.key, upper.value = child.key[:n], child.value[:n]
        upper.lock_ref = child.lock_ref  # a lock on child covers its whole path, upper included
        upper.last_access = child.last_access
        upper.children = {child.key[n]: child}
        child.parent.children[upper.key[0]] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    # ---- insertion ---------------------------------------------------------------------------
    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Add `key` -> `value`; returns how many leading tokens were already cached.

        The tree keeps its existing slots for that shared part, so the caller frees its own copies
        of `value[:returned]` that it does not already hold through a lock.
        """
        if self.disable:
            return 0
        key = list(key)
        node, i = self.root, 0
        stamp = next(_clock)
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                new = TreeNode(node)
                new.key, new.value = key[i:], value[i:].clone()
                new.last_access = stamp
                node.children[key[i]] = new
                self._evictable += len(new.key)
                return i
            child.last_access = stamp
            n = _common_len(child.key, key[i:])
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            i += n
        return i

    # ---- locking -----------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of a node that is not locked")
            node.lock_ref -= 1
            node = node.parent

    # ---- eviction ----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unlocked leaves, oldest first; returns freed."""
        if self.disable or num_tokens <= 0:
            return 0
        leaves = [n for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def evict_all(self) -> int:
        return self.evict(self._evictable)

    def _leaves(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root:
                out.append(node)
            stack.extend(node.children.values())
        return out
