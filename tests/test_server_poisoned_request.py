"""One poisoned request in a batch of 8 on a live server with a real (tiny random Qwen2) model
fails alone: the other 7 finish exactly as in a clean run, the KV books balance (strict leak check
in the engine), and the radix cache survives (a repeated prompt still reports cached tokens).

The poison: `PoisonedRunner` (loaded in the engine through NL_TEST_RUNNER) turns the logits row of
any request whose new tokens include MARK into NaN, as a model that broke on that input would.
A sampled (non-greedy) request with a NaN row used to draw the id `vocab_size`, so the next
forward raised and every request in flight failed with the pool and cache reset.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from nlcli.engine.model_executor.model_runner import ModelRunner
from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # a live server

NEW_TOKENS = 16
MARK = 49151  # the last id of the tiny model's vocabulary; no clean prompt carries it


class PoisonedRunner(ModelRunner):
    def forward(self, batch):
        out = super().forward(batch)
        logits = out.next_token_logits.clone()  # the model's output is an inference tensor
        start = 0
        for i, n in enumerate(batch.extend_lens_cpu):
            if MARK in batch.input_ids[start: start + n].tolist():
                logits[i] = float("nan")
            start += n
        return dataclasses.replace(out, next_token_logits=logits)


def body(ids, **sampling):
    sp = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **sampling}
    return {"input_ids": ids, "sampling_params": sp}


async def post_all(url, bodies):
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(client.post(url + "/generate", json=b) for b in bodies))


def test_poisoned_request_fails_alone(tiny_model_dir, tmp_path):
    import transformers

    path = tiny_model_dir("qwen2")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert MARK == len(tok) - 1
    prompts = [tok.encode(f"Request {i}: " + "tell me something new " * (1 + i % 4)) for i in range(8)]
    srv = LiveServer(str(tmp_path), ["--dtype", "float32", "--max-total-tokens", "4096"],
                     model_path=path,
                     env={"NL_TEST_RUNNER": "tests.test_server_poisoned_request:PoisonedRunner"})
    try:
        clean = asyncio.run(post_all(srv.url, [body(p) for p in prompts]))
        assert all(r.status_code == 200 for r in clean), [r.text for r in clean]
        clean_texts = [r.json()["text"] for r in clean]
        assert httpx.post(srv.url + "/flush_cache", timeout=60).status_code == 200

        # Request 3 is poisoned and sampled (not greedy); a tenth asks for a repetition penalty
        # that is 0.0 in float32, which is refused up front, naming the field.
        bodies = [body(p) for p in prompts]
        bodies[3] = body(prompts[3] + [MARK], temperature=0.7)
        bodies.append(body(prompts[0], repetition_penalty=1e-300, temperature=0.7))
        rs = asyncio.run(post_all(srv.url, bodies))
        assert rs[8].status_code == 400 and "repetition_penalty" in rs[8].json()["error"]["message"]
        assert rs[3].status_code == 500, rs[3].text
        assert "not finite" in rs[3].json()["error"]["message"]
        others = [i for i in range(8) if i != 3]
        assert [rs[i].status_code for i in others] == [200] * 7, [rs[i].text for i in others]
        assert [rs[i].json()["text"] for i in others] == [clean_texts[i] for i in others]

        # The radix cache was not reset: a clean prompt again is served from it.
        again = httpx.post(srv.url + "/generate", json=body(prompts[1]), timeout=300).json()
        assert again["meta_info"]["cached_tokens"] == len(prompts[1]) - 1
        assert again["text"] == clean_texts[1]
    finally:
        srv.stop()
    log = srv.log()
    assert "leak" not in log.lower()
    assert "A scheduler step failed" not in log and "Internal error in the engine" not in log
