"""`nl serve` under memory pressure, on SIGTERM, and when its engine dies (fake paging runner)."""

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.test_scheduler_fakes import LiveServer, reference_greedy

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes once its parent has exited.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_small_pool_retracts_then_sigterm_leaves_no_child(tmp_path):
    # Each request needs ~20 prompt + 60 output tokens; the pool holds about two of them.
    srv = LiveServer(str(tmp_path), ["--max-total-tokens", "170", "--context-length", "512"],
                     env={"NL_FAKE_STEP_DELAY": "0.002"})
    try:
        prompts = [[65 + i] * (16 + i) for i in range(8)]

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                rs = await asyncio.gather(*[client.post(srv.url + "/generate", json={
                    "input_ids": p, "sampling_params": {"temperature": 0, "max_new_tokens": 60,
                                                        "ignore_eos": True}}) for p in prompts])
            return [r.json()["meta_info"]["completion_tokens"] for r in rs], [r.json()["text"] for r in rs]

        counts, texts = asyncio.run(run())
        assert counts == [60] * 8
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(srv.model_path)
        assert texts == [tok.decode(reference_greedy(p, 60, True), skip_special_tokens=True) for p in prompts]
        assert "Retract requests" in srv.log()
        children = srv.engine_pids()
        assert children
        assert srv.stop(signal.SIGTERM) == 0
        time.sleep(0.5)
        assert not any(_alive(pid) for pid in children)
        assert "leak" not in srv.log()
    finally:
        srv.stop(signal.SIGKILL)


def test_engine_death_fails_fast_and_exits_nonzero(tmp_path):
    srv = LiveServer(str(tmp_path), env={"NL_FAKE_STEP_DELAY": "0.01"})
    try:
        engine = srv.engine_pid()

        async def run():
            async with httpx.AsyncClient(timeout=30) as client:
                pending = asyncio.create_task(client.post(srv.url + "/generate", json={
                    "text": "doomed", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
                await asyncio.sleep(0.5)
                os.kill(engine, signal.SIGKILL)
                start = time.monotonic()
                try:
                    r = await pending
                    status = r.status_code
                except httpx.HTTPError:
                    status = None  # the server may close the connection while exiting
                return status, time.monotonic() - start

        status, waited = asyncio.run(run())
        assert status is None or status >= 500
        assert waited < 5
        srv.proc.wait(30)
        assert srv.proc.returncode not in (0, None)
    finally:
        srv.stop(signal.SIGKILL)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tmp_path):
    # Token 5 makes the fake forward raise; every request in that batch must fail with a 500,
    # the KV books must stay balanced (strict leak check is on), the radix cache must not keep
    # the failed batch's unwritten KV, and later requests must be served normally.
    srv = LiveServer(str(tmp_path), ["--context-length", "512"], env={"NL_FAKE_FAIL_TOKEN": "5"})
    try:
        prompt = [72, 105, 33] * 6
        sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        first = httpx.post(srv.url + "/generate", json={"input_ids": prompt, "sampling_params": sp},
                           timeout=60)
        assert first.status_code == 200
        bad = httpx.post(srv.url + "/generate", timeout=60,
                         json={"input_ids": prompt + [5, 72], "sampling_params": sp})
        assert bad.status_code == 500, bad.text
        assert "Internal error in the engine" in bad.json()["error"]["message"]
        oai = httpx.post(srv.url + "/v1/completions", timeout=60,
                         json={"model": "m", "prompt": [5, 66, 67], "max_tokens": 4})
        assert oai.status_code == 500 and oai.json()["object"] == "error"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        again = httpx.post(srv.url + "/generate", json={"input_ids": prompt, "sampling_params": sp},
                           timeout=60).json()
        assert again["text"] == first.json()["text"]
        assert again["meta_info"]["cached_tokens"] == 0  # the pool was reset, nothing stale reused
        want = reference_greedy(prompt, 12, ignore_eos=True)
        assert again["meta_info"]["completion_tokens"] == len(want)
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert log.count("the engine keeps serving") == 2 and "leak" not in log
    assert "exited unexpectedly" not in log
