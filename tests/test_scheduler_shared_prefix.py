"""Requests that share a prefix nobody has cached yet, arriving together: the prefix is computed
once (one carrier prefills it, the sharers are held a step and then match it in the radix cache),
with whole or chunked prefill, under lpm and fcfs; and a prefix enters the cache as soon as its
prefill is written, not when its request finishes. Outputs equal the unpaged reference (fake
runner) and transformers' greedy decoding (tiny real model); the books balance throughout."""

from __future__ import annotations

import random

import pytest

from tests.test_scheduler import Harness
from tests.test_scheduler_fakes import greedy, reference_greedy

PREFIX = 700


@pytest.fixture(autouse=True)
def strict_books(monkeypatch):
    monkeypatch.setenv("NL_TEST_STRICT_LEAK", "1")


def _shared_prompts(n, prefix_len, seed=0):
    rng = random.Random(seed)
    prefix = [rng.randrange(32, 127) for _ in range(prefix_len)]
    # Each suffix starts with its own token, so exactly `prefix_len` tokens are shared.
    return prefix, [prefix + [32 + i] + [rng.randrange(32, 127) for _ in range(rng.randint(5, 30))]
                    for i in range(n)]


def _prompt_tokens_computed(h, outputs) -> int:
    """Tokens fed through the runner, less the sampled tokens fed back one per decode."""
    fed = sum(sum(b.extend_lens_cpu) for b in h.runner.forward_calls)
    return fed - sum(max(len(o) - 1, 0) for o in outputs)


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
@pytest.mark.parametrize("chunk", [-1, 256])
def test_32_requests_sharing_a_new_prefix_compute_it_once(policy, chunk):
    h = Harness(pool_size=8192, context_len=1024, schedule_policy=policy,
                chunked_prefill_size=chunk)
    _, prompts = _shared_prompts(32, PREFIX)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(8, ignore_eos=True))
    h.drain()
    outs = [h.ids[str(i)] for i in range(32)]
    assert outs == [reference_greedy(p, 8, ignore_eos=True) for p in prompts]
    suffixes = sum(len(p) - PREFIX for p in prompts)
    assert _prompt_tokens_computed(h, outs) == PREFIX + suffixes  # not 32 * PREFIX
    assert sorted(h.final[str(i)]["cached"] for i in range(32)) == [0] + [PREFIX] * 31


def test_sharers_wait_for_a_chunked_carrier_and_keep_the_budget():
    h = Harness(pool_size=8192, context_len=1024, chunked_prefill_size=128, max_prefill_tokens=200)
    _, prompts = _shared_prompts(12, 300, seed=1)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(5, ignore_eos=True))
    h.drain()
    outs = [h.ids[str(i)] for i in range(12)]
    assert outs == [reference_greedy(p, 5, ignore_eos=True) for p in prompts]
    assert _prompt_tokens_computed(h, outs) == 300 + sum(len(p) - 300 for p in prompts)
    assert all(b.num_tokens <= 200 for b in h.runner.forward_calls)


def test_short_shared_heads_are_not_held():
    # A common head shorter than the threshold (a first word) is not worth a step of latency.
    h = Harness(pool_size=4096)
    _, prompts = _shared_prompts(6, 8, seed=2)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(3, ignore_eos=True))
    h.sched.step()
    assert h.runner.forward_calls[0].batch_size == 6
    h.drain()


def test_prefix_is_cached_while_its_request_still_runs():
    h = Harness(pool_size=4096)
    prompt = _shared_prompts(1, 60, seed=3)[1][0]
    h.submit("first", prompt, greedy(50, ignore_eos=True))
    h.sched.step()  # its prefill; it keeps decoding for many steps
    h.submit("again", prompt, greedy(4, ignore_eos=True))
    h.sched.step()
    h._collect()
    assert "first" not in h.final and h.sched.mem.counts().protected >= len(prompt)
    h.drain()
    assert h.final["again"]["cached"] == len(prompt) - 1
    assert h.ids["again"] == reference_greedy(prompt, 4, ignore_eos=True)
    assert h.ids["first"] == reference_greedy(prompt, 50, ignore_eos=True)


def test_retraction_after_early_caching_keeps_output(monkeypatch):
    monkeypatch.setenv("NL_TEST_RETRACT", "1")
    h = Harness(pool_size=4096, context_len=1024)
    _, prompts = _shared_prompts(10, 100, seed=4)
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(20, ignore_eos=True))
    h.drain()
    assert h.sched.books.num_retractions > 0
    for i, p in enumerate(prompts):
        assert h.ids[str(i)] == reference_greedy(p, 20, ignore_eos=True)


@pytest.mark.slow
def test_shared_prefix_on_a_real_model_equals_transformers(tiny_model_dir):
    import torch
    import transformers

    from tests.tiny_models import make_runner

    path = tiny_model_dir("qwen2")
    runner = make_runner(path, max_total_tokens=4096, max_running_requests=16)
    h = Harness(runner=runner, model_path=path, dtype="float32", max_total_tokens=4096,
                chunked_prefill_size=128)
    rng = random.Random(5)
    prefix = [rng.randrange(300, 3000) for _ in range(200)]
    prompts = [prefix + [3000 + i] + [rng.randrange(300, 3000) for _ in range(rng.randint(3, 12))]
               for i in range(12)]
    for i, p in enumerate(prompts):
        h.submit(str(i), p, greedy(8, ignore_eos=True))
    h.drain()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=2)[0, len(p):].tolist()
        assert h.ids[str(i)] == ref, i
    assert sorted(h.final[str(i)]["cached"] for i in range(12)) == [0] + [200] * 11
