"""The attention plan: computed once per forward, carried by the batch, and no layer syncs.

The Triton backend's own code path runs on the CPU with each kernel's torch reference in its place
(same signatures). The references read lengths on the host, which the real kernels never do, so
they alone are exempt from the guard; everything else a forward runs (plan, layers, logits) would
fail the test if it read a device value on the host.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.attention import TorchAttentionBackend
from nlcli.engine.layers.triton_attention import (
    TritonAttentionBackend,
    TritonKernels,
    decode_kv_splits,
    reference_kernels,
)
from tests.host_sync import HostSyncError, allow_host_sync, no_host_sync
from tests.kernel_harness import load_kernels
from tests.tiny_models import EngineDriver, make_runner

# Import the kernel modules (for their references) the way the kernel tests want them loaded, so
# this module does not push the kernel tests that follow it into a fresh process.
load_kernels(["nlcli.kernels.decode_attention", "nlcli.kernels.extend_attention",
              "nlcli.kernels.kv_store"])

PROMPTS = [[1, 504, 3575, 282, 4649, 314], [9690, 198], list(range(300, 347)), [42]]


def guarded_reference_kernels() -> TritonKernels:
    refs = reference_kernels()
    return TritonKernels(*(allow_host_sync(f) for f in dataclasses.astuple(refs)))


class CountingTriton(TritonAttentionBackend):
    plans = 0

    def plan(self, batch, for_graph=False):
        self.plans += 1
        return super().plan(batch, for_graph)


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    """(eager torch-backend runner, runner on the Triton path with reference kernels)."""
    path = tiny_model_dir("llama")
    torch_runner, triton_runner = make_runner(path), make_runner(path)
    triton_runner.attn_backend = CountingTriton(
        triton_runner.req_to_token_pool, triton_runner.token_to_kv_pool, guarded_reference_kernels(),
        num_sms=8,
    )
    forward = triton_runner.forward

    def forward_without_sync(batch: ForwardBatch):
        with no_host_sync():
            return forward(batch)

    triton_runner.forward = forward_without_sync
    assert isinstance(torch_runner.attn_backend, TorchAttentionBackend)
    return torch_runner, triton_runner


def test_guard_catches_a_host_sync():
    with no_host_sync(), pytest.raises(HostSyncError):
        torch.ones(2).sum().item()
    with no_host_sync(), pytest.raises(HostSyncError):
        if torch.ones(1) > 0:
            pass
    assert torch.ones(1).item() == 1.0  # restored afterwards


def test_triton_path_plans_once_per_forward_without_host_sync(runners):
    torch_runner, triton_runner = runners
    backend = triton_runner.attn_backend
    state_before = dict(vars(backend))
    ours, ref = EngineDriver(triton_runner), EngineDriver(torch_runner)
    rids = [ours.new_request() for _ in PROMPTS]
    ref_rids = [ref.new_request() for _ in PROMPTS]
    steps = [PROMPTS, [[7], [8], [9], [10]], [[11], list(range(50, 70)), [12], [13, 14]]]
    for step, new_ids in enumerate(steps):
        plans_before = backend.plans
        got = ours.forward(rids, new_ids, return_all_logits=True)
        expected = ref.forward(ref_rids, new_ids, return_all_logits=True)
        assert backend.plans == plans_before + 1, "the plan must be computed exactly once"
        torch.testing.assert_close(got.all_logits, expected.all_logits, rtol=1e-4, atol=1e-4)
    assert {k: v for k, v in vars(backend).items() if k != "plans"} == \
        {k: v for k, v in state_before.items() if k != "plans"}, "the backend kept per-forward state"
    ours.free_all()
    ref.free_all()


def test_plan_lives_on_the_batch(runners):
    _, triton_runner = runners
    driver = EngineDriver(triton_runner)
    rid = driver.new_request()
    slots = triton_runner.token_to_kv_pool_allocator.alloc(3)
    triton_runner.req_to_token_pool.req_to_token[driver.rows[rid], :3] = slots
    batch = ForwardBatch.create([[5, 6, 7]], [0], [driver.rows[rid]], slots)
    batch.plan_attention(triton_runner.attn_backend)
    assert batch.attn_plan.max_extend_len == 3 and not batch.attn_plan.decode
    assert batch.attn_plan.qo_start_loc.tolist() == [0]
    triton_runner.token_to_kv_pool_allocator.free(slots)
    triton_runner.req_to_token_pool.free([driver.rows.pop(rid)])


@pytest.mark.parametrize("bs,kv_heads,sms,max_seq,expected", [
    (1, 8, 132, None, 16),  # one request: as many splits as allowed
    (1, 8, 132, 100, 2),  # but no more than 64-key blocks
    (64, 8, 132, 4000, 1),  # a big batch fills the GPU without splitting
    (4, 2, 132, 10_000, 16),
    (4, 8, 16, None, 1),
])
def test_decode_kv_splits(bs, kv_heads, sms, max_seq, expected):
    splits = decode_kv_splits(bs, kv_heads, sms, max_seq)
    assert splits == expected and splits & (splits - 1) == 0
