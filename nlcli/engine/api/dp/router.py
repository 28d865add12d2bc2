"""Which engine group gets a request (--load-balance-method), decided in the API process from
the prompt's token ids and each group's number of requests in flight.

- round_robin (SGLang's default, `auto`): groups in turn.
- shortest_queue (SGLang's `total_requests`): the group with the fewest requests in flight.
- cache_aware (sglang-router's policy, here on token ids instead of text): each group has an
  approximate radix tree of the prompts routed to it. While the groups are balanced, a request
  goes to the group with the longest prefix match if that covers more than CACHE_THRESHOLD of the
  prompt, else to the shortest queue; when they are unbalanced, to the shortest queue. The prompt
  is then recorded in the chosen group's tree.

Loads come from the caller (requests registered and not finished, per group), so an aborted or
failed request stops counting the moment it ends; the router keeps no counters that could drift.
"""

from __future__ import annotations

from typing import Sequence

from nlcli.engine.api.dp.approx_radix import ApproxRadixTree

# sglang-router's defaults (--cache-threshold, --balance-abs-threshold, --balance-rel-threshold).
# A match must cover more than this share of the prompt to decide the group.
CACHE_THRESHOLD = 0.3
# Groups are unbalanced when the busiest has more than this many requests over the idlest...
BALANCE_ABS_THRESHOLD = 64
# ...and more than this many times as many.
BALANCE_REL_THRESHOLD = 1.5
# Tokens each group's tree may hold before its least recently used prompts are forgotten
# (sglang-router bounds its tree the same way, --max-tree-size).
MAX_TREE_TOKENS = 1 << 20

# SGLang's spellings mapped to the policy nl runs.
METHODS = {"auto": "round_robin", "round_robin": "round_robin", "total_requests": "shortest_queue",
           "shortest_queue": "shortest_queue", "cache_aware": "cache_aware"}


class Router:
    """round_robin; the base of the other policies."""

    def __init__(self, n: int):
        self.n = n
        self._next = 0

    def choose(self, input_ids: Sequence[int], loads: Sequence[int]) -> int:
        group = self._next
        self._next = (self._next + 1) % self.n
        return group

    def forget(self) -> None:
        """The groups' caches were flushed (or the weights changed): nothing is cached now."""


class ShortestQueueRouter(Router):
    def choose(self, input_ids: Sequence[int], loads: Sequence[int]) -> int:
        return min(range(self.n), key=lambda g: (loads[g], g))


class CacheAwareRouter(Router):
    def __init__(self, n: int, max_tree_tokens: int = MAX_TREE_TOKENS):
        super().__init__(n)
        self.trees = [ApproxRadixTree(max_tree_tokens) for _ in range(n)]

    def choose(self, input_ids: Sequence[int], loads: Sequence[int]) -> int:
        group = self._pick(input_ids, loads)
        self.trees[group].insert(input_ids)
        return group

    def _pick(self, input_ids: Sequence[int], loads: Sequence[int]) -> int:
        # The idlest group; among equals the one that has cached least (most room for new
        # prefixes, sglang-router's fallback), then the lowest index.
        idlest = min(range(self.n), key=lambda g: (loads[g], self.trees[g].size, g))
        if balanced(loads) and input_ids:
            matches = [tree.match(input_ids) for tree in self.trees]
            best = max(range(self.n), key=lambda g: (matches[g], -loads[g], -g))
            if matches[best] / len(input_ids) > CACHE_THRESHOLD:
                return best
        return idlest

    def forget(self) -> None:
        for tree in self.trees:
            tree.clear()


def balanced(loads: Sequence[int]) -> bool:
    """Not unbalanced in sglang-router's sense (both thresholds exceeded)."""
    hi, lo = max(loads), min(loads)
    return not (hi - lo > BALANCE_ABS_THRESHOLD and hi > lo * BALANCE_REL_THRESHOLD)


def make_router(method: str, n: int) -> Router:
    """The router for --load-balance-method `method` (SGLang's names accepted) over n groups."""
    policy = METHODS.get(method)
    if policy is None:
        raise ValueError(f"--load-balance-method {method} is not supported by nl (one of: "
                         f"{', '.join(METHODS)})")
    return {"round_robin": Router, "shortest_queue": ShortestQueueRouter,
            "cache_aware": CacheAwareRouter}[policy](n)
