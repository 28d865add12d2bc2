"""SIGTERM with requests in flight: refuse new work, drain up to --shutdown-timeout, then end what is
left through the normal output path (a final abort event and [DONE], or a 503 in the route's
envelope), reap the engine, and say in the exit code whether anything had to be aborted."""

import asyncio
import signal
import time

import httpx
import orjson
import pytest

from nlcli.engine.launch import EXIT_ABORTED
from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow

LONG = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
SHORT = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _events(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event) -> list:
    """Every `data:` payload of an SSE response ([DONE] as the string)."""
    out = []
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else orjson.loads(data))
                started.set()
    return out


def _clean_log(srv: LiveServer) -> str:
    log = srv.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
    return log


def _gone(srv: LiveServer, children: list[int]) -> None:
    time.sleep(0.3)
    assert children and not any(_alive(pid) for pid in children)


def test_sigterm_drains_then_aborts_the_rest_through_the_normal_path(tmp_path):
    srv = LiveServer(str(tmp_path), ["--shutdown-timeout", "3"], env={"NL_FAKE_STEP_DELAY": "0.05"})
    try:
        children = srv.engine_pids()

        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                ev = [asyncio.Event() for _ in range(3)]
                native = asyncio.create_task(_events(c, srv.url + "/generate", {
                    "text": "long", "stream": True, "sampling_params": LONG}, ev[0]))
                oai = asyncio.create_task(_events(c, srv.url + "/v1/completions", {
                    "model": "m", "prompt": "long", "max_tokens": 400, "stream": True,
                    "ignore_eos": True, "temperature": 0}, ev[1]))
                short = asyncio.create_task(_events(c, srv.url + "/generate", {
                    "text": "short", "stream": True, "sampling_params": SHORT}, ev[2]))
                whole = asyncio.create_task(c.post(srv.url + "/generate", json={
                    "text": "whole", "sampling_params": LONG}))
                whole_oai = asyncio.create_task(c.post(srv.url + "/v1/completions", json={
                    "model": "m", "prompt": "whole", "max_tokens": 400, "ignore_eos": True}))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ev)), 30)
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                # Draining: not ready, new work refused, in-flight work still running.
                health = (await c.get(srv.url + "/health")).status_code
                refused = await c.post(srv.url + "/generate", json={
                    "text": "late", "sampling_params": SHORT})
                assert not native.done() and not whole.done()
                return (await native, await oai, await short, await whole, await whole_oai,
                        health, refused)

        native, oai, short, whole, whole_oai, health, refused = asyncio.run(run())
        assert health == 503
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        # Finished within the drain: a normal ending.
        assert short[-1] == "[DONE]"
        assert short[-2]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
        # Still running at the deadline: a final abort event with a message, then [DONE].
        assert native[-1] == "[DONE]"
        reason = native[-2]["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "shutting down" in reason["message"]
        assert 0 < native[-2]["meta_info"]["completion_tokens"] < 400
        assert oai[-1] == "[DONE]"
        assert oai[-2]["choices"][0]["finish_reason"] == "abort"
        assert whole.status_code == 503 and "shutting down" in whole.json()["error"]["message"]
        assert whole_oai.status_code == 503
        assert whole_oai.json()["object"] == "error" and "shutting down" in whole_oai.json()["message"]
        assert srv.proc.wait(30) == EXIT_ABORTED
        _gone(srv, children)
        log = _clean_log(srv)
        assert "aborting 4 request(s)" in log
    finally:
        srv.stop(signal.SIGKILL)


def test_sigterm_with_requests_that_finish_in_time_exits_zero(tmp_path):
    srv = LiveServer(str(tmp_path), ["--shutdown-timeout", "60"],
                     env={"NL_FAKE_STEP_DELAY": "0.05"})
    try:
        children = srv.engine_pids()

        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                started = asyncio.Event()
                stream = asyncio.create_task(_events(c, srv.url + "/generate", {
                    "text": "s", "stream": True, "sampling_params": {**SHORT, "max_new_tokens": 40}},
                    started))
                await asyncio.wait_for(started.wait(), 30)
                srv.proc.send_signal(signal.SIGTERM)
                return await stream

        events = asyncio.run(run())
        assert events[-1] == "[DONE]" and events[-2]["meta_info"]["completion_tokens"] == 40
        assert srv.proc.wait(30) == 0
        _gone(srv, children)
        _clean_log(srv)
    finally:
        srv.stop(signal.SIGKILL)


def test_second_signal_exits_at_once(tmp_path):
    srv = LiveServer(str(tmp_path), ["--shutdown-timeout", "120"],
                     env={"NL_FAKE_STEP_DELAY": "0.05"})
    try:
        children = srv.engine_pids()

        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                started = asyncio.Event()
                stream = asyncio.create_task(_events(c, srv.url + "/generate", {
                    "text": "s", "stream": True, "sampling_params": LONG}, started))
                await asyncio.wait_for(started.wait(), 30)
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGINT)
                events = await stream
                return events, time.monotonic() - t0

        events, waited = asyncio.run(run())
        assert srv.proc.wait(15) == EXIT_ABORTED
        assert waited < 10
        assert events[-1] == "[DONE]" and events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
        _gone(srv, children)
        _clean_log(srv)
    finally:
        srv.stop(signal.SIGKILL)
