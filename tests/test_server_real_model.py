"""The serving runtime on a real (tiny random Qwen2) model rather than the fake runner: greedy
output under 32-way concurrency, under a KV pool so small that requests must be retracted and
resumed, and with prefix reuse, all equal to transformers' own greedy `generate`."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # two live servers

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import transformers

    path = tiny_model_dir("qwen2")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [tok.encode(f"Request {i}: " + "tell me something new " * (1 + i % 5)) for i in range(32)]
    refs = []
    for ids in prompts:
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          min_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)
        refs.append(out[0, len(ids):].tolist())
    return path, prompts, refs


def body(ids):
    return {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                  "ignore_eos": True}}


async def run_concurrently(url, prompts):
    async with httpx.AsyncClient(timeout=300) as client:
        rs = await asyncio.gather(*(client.post(url + "/generate", json=body(p)) for p in prompts))
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json() for r in rs]


def test_32_concurrent_requests_equal_transformers(model, tmp_path):
    path, prompts, refs = model
    srv = LiveServer(str(tmp_path), ["--dtype", "float32", "--max-total-tokens", "8192"],
                     model_path=path)
    try:
        outs = asyncio.run(run_concurrently(srv.url, prompts))
        assert all(o["meta_info"]["completion_tokens"] == NEW_TOKENS for o in outs)
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(path)
        assert [o["text"] for o in outs] == [tok.decode(r) for r in refs]
        # Prefix reuse on a real model: the same prompt again is served from the radix cache.
        again = httpx.post(srv.url + "/generate", json=body(prompts[0]), timeout=300).json()
        assert again["meta_info"]["cached_tokens"] == len(prompts[0]) - 1
        assert again["text"] == outs[0]["text"]
    finally:
        srv.stop()
    assert "leak" not in srv.log()


def test_tiny_pool_retracts_and_resumes_with_identical_output(model, tmp_path):
    path, prompts, refs = model
    chosen = prompts[:8]
    need = max(len(p) for p in chosen) + NEW_TOKENS
    srv = LiveServer(str(tmp_path), ["--dtype", "float32", "--max-total-tokens", str(need + 8)],
                     model_path=path)
    try:
        outs = asyncio.run(run_concurrently(srv.url, chosen))
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(path)
        assert [o["text"] for o in outs] == [tok.decode(r) for r in refs[:8]]
    finally:
        srv.stop()
    log = srv.log()
    assert "leak" not in log
    assert "etract" in log  # the pool really ran dry and requests were retracted
