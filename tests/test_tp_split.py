"""How tensor-parallel work splits (distributed/split.py), and the default CPU threads per rank:
pure functions, checked against the definition (every head on exactly one rank, each query head
with its own KV head), no processes."""

from __future__ import annotations

import pytest

from nlcli.engine.distributed.split import attention_split, split_range
from nlcli.engine.model_executor import device


@pytest.mark.parametrize("n,size", [(49152, 2), (1536, 2), (9, 2), (7, 3), (2, 4)])
def test_split_range_covers_every_item_once_in_order(n, size):
    ranges = [split_range(n, size, r) for r in range(size)]
    assert [i for start, count in ranges for i in range(start, start + count)] == list(range(n))
    assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1


@pytest.mark.parametrize("heads,kv,size", [(9, 3, 2), (4, 4, 2), (4, 1, 2), (4, 2, 4), (8, 2, 3),
                                           (9, 3, 4), (32, 8, 8), (4, 4, 1)])
def test_attention_split_gives_each_query_head_once_with_its_kv_head(heads, kv, size):
    group, seen = heads // kv, []
    for rank in range(size):
        s = attention_split(heads, kv, rank, size)
        assert s.q_count >= 1 and s.kv_count >= 1
        q_heads = range(s.q_start, s.q_start + s.q_count)
        # Within a rank, local query head j uses local KV head j // group (GQA's grouping).
        for j, q in enumerate(q_heads):
            assert q // group == s.kv_start + j // group
        seen += q_heads
    assert sorted(seen) == list(range(heads))


def test_smollm2_splits_six_and_three_heads_over_two_ranks():
    assert attention_split(9, 3, 0, 2) == (0, 6, 0, 2)
    assert attention_split(9, 3, 1, 2) == (6, 3, 2, 1)


def test_too_many_ranks_for_the_heads_is_refused():
    with pytest.raises(ValueError, match="--tp-size 8"):
        attention_split(4, 1, 0, 8)


def test_ranks_on_a_node_share_its_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "physical_cores", lambda: 8)
    assert device.cpu_threads(None, 2)[0] == 4
    assert device.cpu_threads(None, 16)[0] == 1
    assert device.cpu_threads(None)[0] == 8
    assert device.cpu_threads(3, 2)[0] == 3  # --num-threads wins
