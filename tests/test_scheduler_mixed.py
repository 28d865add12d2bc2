"""TTFT under load: the prefill token budget (sized for the device, `--max-prefill-tokens` wins)
and mixed batches, where running requests' decode tokens ride in the forward that prefills new
prompts, so they keep decoding while a long prompt prefills chunk by chunk and first tokens come
in arrival order. Outputs equal the unpaged reference; the budget counts the decode tokens."""

from __future__ import annotations

import pytest

from nlcli.engine.args import CPU_MAX_PREFILL_TOKENS, GPU_MAX_PREFILL_TOKENS, ServerArgs
from nlcli.engine.io_struct import TokenizedGenerateReqInput
from tests.test_scheduler import Harness, _prompts
from tests.test_scheduler_fakes import greedy, reference_greedy


@pytest.fixture(autouse=True)
def strict_books(monkeypatch):
    monkeypatch.setenv("NL_TEST_STRICT_LEAK", "1")


def test_budget_and_mixing_defaults_follow_the_device():
    auto = ServerArgs()
    assert auto.prefill_token_budget("cpu") == CPU_MAX_PREFILL_TOKENS < GPU_MAX_PREFILL_TOKENS
    assert auto.prefill_token_budget("cuda") == GPU_MAX_PREFILL_TOKENS
    assert ServerArgs(max_prefill_tokens=512).prefill_token_budget("cuda") == 512
    assert auto.mixed_chunk("cpu") and not auto.mixed_chunk("cuda")
    assert ServerArgs(enable_mixed_chunk=True).mixed_chunk("cuda")
    assert not ServerArgs(enable_mixed_chunk=False).mixed_chunk("cpu")
    assert Harness().sched.max_prefill_tokens == CPU_MAX_PREFILL_TOKENS  # the fake runner: a CPU
    assert Harness(max_prefill_tokens=300).sched.max_prefill_tokens == 300


def _tokens_per_step_while_prefilling(**args):
    h = Harness(chunked_prefill_size=32, max_prefill_tokens=64, **args)
    short, long_ = _prompts(1, seed=7, lo=10, hi=10)[0], _prompts(1, seed=8, lo=300, hi=300)[0]
    h.submit("short", short, greedy(60, ignore_eos=True))
    h.sched.step()  # its prefill: it is running now
    h.submit("long", long_, greedy(5, ignore_eos=True))
    running = h.sched.outputs.find("short")
    counts = []
    while h.sched.outputs.find("long").output_ids == []:
        before = len(running.output_ids)
        h.sched.step()
        counts.append(len(running.output_ids) - before)
    h.drain()
    assert h.ids["short"] == reference_greedy(short, 60, ignore_eos=True)
    assert h.ids["long"] == reference_greedy(long_, 5, ignore_eos=True)
    return counts, h


def test_running_request_decodes_every_step_while_a_long_prompt_prefills():
    counts, h = _tokens_per_step_while_prefilling()
    assert len(counts) >= 300 // 64 and counts == [1] * len(counts)
    # One forward per step, each within the budget, decode token included.
    assert all(b.num_tokens <= 64 for b in h.runner.forward_calls)
    mixed = [b for b in h.runner.forward_calls if 1 in b.extend_lens_cpu and b.batch_size > 1]
    assert len(mixed) >= len(counts)


def test_without_mixing_decode_waits_for_the_prefill():
    counts, _ = _tokens_per_step_while_prefilling(enable_mixed_chunk=False)
    assert counts.count(0) >= 300 // 64  # every chunk step stalled the running request


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_first_tokens_arrive_in_arrival_order(policy):
    h = Harness(chunked_prefill_size=64, max_prefill_tokens=96, schedule_policy=policy)
    prompts = _prompts(8, seed=9, lo=60, hi=120)
    for i, p in enumerate(prompts):
        h.sched.handle(TokenizedGenerateReqInput(str(i), p, greedy(30, ignore_eos=True),
                                                 stream=True))
    first: list[str] = []
    while h.sched.step():
        for m in h.msgs:
            first += [rid for rid in getattr(m, "rids", []) if rid not in first]
        h._collect()
    assert first == [str(i) for i in range(8)]
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 30, ignore_eos=True)


def test_prompt_logprobs_in_a_mixed_batch_equal_those_alone():
    def logprobs(with_running: bool):
        h = Harness(chunked_prefill_size=16, max_prefill_tokens=32)
        if with_running:
            h.submit("bg", _prompts(1, seed=10)[0], greedy(40, ignore_eos=True))
            h.sched.step()
        h.sched.handle(TokenizedGenerateReqInput("lp", list(range(40, 90)),
                                                 greedy(3, ignore_eos=True), return_logprob=True,
                                                 logprob_start_len=0))
        reqs = []
        while h.sched.step():
            r = h.sched.outputs.find("lp")
            reqs = [r] if r is not None else reqs
        assert reqs and reqs[0].input_token_logprobs is not None
        mixed = sum(1 in b.extend_lens_cpu and b.batch_size > 1 for b in h.runner.forward_calls)
        return reqs[0].input_token_logprobs, reqs[0].output_token_logprobs, mixed

    alone, together = logprobs(False), logprobs(True)
    assert together[2] > 0 and alone[2] == 0  # the second run really mixed
    assert together[:2] == alone[:2]
