"""The start-up measurement of how large a decode batch the C decode step takes
(model_executor/cpu_decode_limit.py): the rule on made-up step costs, then on a live runner."""

from __future__ import annotations

import pytest

from nlcli.cpu_kernels import ops
from nlcli.engine.model_executor.cpu_decode_limit import decode_step_timer, largest_winning_batch
from tests.tiny_models import EngineDriver, make_runner


def _costs(per_op: dict, fused: dict, calls: list):
    def step_seconds(batch: int, is_fused: bool):
        calls.append((batch, is_fused))
        return (fused if is_fused else per_op).get(batch)
    return step_seconds


def test_grows_from_the_plan_rows_while_the_c_step_wins_by_the_margin():
    calls: list = []
    per_op = {32: 0.100, 64: 0.150, 128: 0.200}
    fused = {32: 0.080, 64: 0.130, 128: 0.190}  # 64: 0.87x wins; 128: 0.95x is within the margin
    limit = largest_winning_batch(_costs(per_op, fused, calls), 16, budget_s=60)
    assert limit.max_batch == 64
    assert [b for b, _ in calls] == [32, 32, 64, 64, 128, 128]
    assert "32: 100.0 -> 80.0 ms" in limit.text()


def test_stops_where_the_pools_end_or_the_budget_would_run_out():
    calls: list = []
    fast = {b: 0.001 for b in (32, 64, 128)}
    limit = largest_winning_batch(_costs({32: 0.01}, fast, calls), 16, budget_s=60)
    assert limit.max_batch == 32  # 64 requests do not fit: that batch is never timed
    calls.clear()
    slow = largest_winning_batch(_costs({32: 1.0, 64: 2.0}, {32: 0.5, 64: 1.0}, calls), 16,
                                 budget_s=1.0)
    assert slow.max_batch == 32 and {b for b, _ in calls} == {32}
    assert largest_winning_batch(_costs({}, {}, calls), 0).max_batch == 0  # no quantized rows


@pytest.mark.skipif(not ops.available(), reason="no C compiler for nl's CPU kernels")
def test_a_live_runner_measures_real_steps_and_frees_what_it_used(tiny_model_dir):
    runner = make_runner(tiny_model_dir("llama"), quantization="int8", max_running_requests=8)
    assert runner.cpu_decode_runner.max_rows >= runner.quant_plan.max_rows
    free_rows = runner.req_to_token_pool.available_size()
    free_slots = runner.token_to_kv_pool_allocator.available_size()
    step_seconds = decode_step_timer(runner)
    assert step_seconds(4, True) > 0 and step_seconds(4, False) > 0
    assert step_seconds(runner.req_to_token_pool.size + 1, True) is None  # more rows than exist
    assert runner.req_to_token_pool.available_size() == free_rows
    assert runner.token_to_kv_pool_allocator.available_size() == free_slots
    assert EngineDriver(runner).generate_greedy([[5, 6, 7]], 3)  # the pools still serve
