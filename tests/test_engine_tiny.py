"""Engine vs transformers on tiny random models of every supported architecture (float32):
batched mixed-length logits, greedy generation, prefix-cached extends, batched decode, slots."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, EngineDriver, make_runner

PROMPTS = [
    [1, 504, 3575, 282, 4649, 314],
    [9690, 198],
    list(range(300, 347)),
    [42],
    list(range(1000, 1019)),
]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engine(request, tiny_model_dir):
    """(driver, transformers reference model) for one architecture."""
    import transformers

    path = tiny_model_dir(request.param)
    runner = make_runner(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    driver = EngineDriver(runner)
    yield driver, ref
    driver.free_all()
    alloc = runner.token_to_kv_pool_allocator
    assert alloc.available_size() == alloc.size, "KV slots leaked"
    assert runner.req_to_token_pool.available_size() == runner.req_to_token_pool.size


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reference_logits(ref, ids) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def test_batch_logits_match_transformers(engine):
    driver, ref = engine
    rids = [driver.new_request() for _ in PROMPTS]
    out = driver.forward(rids, PROMPTS, return_all_logits=True)
    start = 0
    for i, ids in enumerate(PROMPTS):
        expected = reference_logits(ref, ids)
        got = out.all_logits[start : start + len(ids)]
        assert rel_err(got, expected) < 1e-4
        assert rel_err(out.next_token_logits[i], expected[-1]) < 1e-4
        start += len(ids)
    for rid in rids:
        driver.free(rid)


def test_greedy_tokens_match_transformers_generate(engine):
    driver, ref = engine
    ours = driver.generate_greedy(PROMPTS, 32)
    eos = ref.generation_config.eos_token_id
    for ids, got in zip(PROMPTS, ours):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        if eos in got:  # transformers stops at EOS; we decode on regardless
            got = got[: got.index(eos) + 1]
        assert got == expected


def test_extend_on_cached_prefix_equals_full_prefill(engine):
    driver, ref = engine
    full = PROMPTS[2]
    whole = driver.new_request()
    expected = driver.forward([whole], [full], return_all_logits=True).all_logits
    # Same sequence in three pieces: a prefill, then extends on top of the cached slots, one of
    # them batched with a plain decode of the other request.
    split = driver.new_request()
    driver.forward([split], [full[:20]])
    mid = driver.forward([split, whole], [full[20:40], [7]], return_all_logits=True).all_logits
    last = driver.forward([split], [full[40:]], return_all_logits=True).all_logits
    got = torch.cat([mid[:20], last])
    assert rel_err(got, expected[20:]) < 1e-5
    assert rel_err(mid[20], reference_logits(ref, full + [7])[-1]) < 1e-4
    driver.free(whole)
    driver.free(split)


def test_batched_decode_equals_each_alone(engine):
    driver, _ = engine
    prompts = [[100 + 37 * i + j for j in range(3 + 5 * i)] for i in range(8)]
    together = driver.generate_greedy(prompts, 12)
    alone = [driver.generate_greedy([p], 12)[0] for p in prompts]
    assert together == alone


def test_slots_return_to_the_allocator(engine):
    driver, _ = engine
    alloc = driver.runner.token_to_kv_pool_allocator
    before = alloc.available_size()
    rids = [driver.new_request() for _ in range(3)]
    driver.forward(rids, PROMPTS[:3])
    assert alloc.available_size() == before - sum(len(p) for p in PROMPTS[:3])
    driver.forward(rids, [[5], [6], [7]])
    for rid in rids:
        driver.free(rid)
    assert alloc.available_size() == alloc.size == before
