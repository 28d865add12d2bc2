"""Operator protections: the engine watchdog (a step over --watchdog-timeout dumps every thread's
stack and turns /health 503; one over twice that kills the engine), and the loud warning for a
server reachable from the network without an API key."""

import asyncio
import signal
import time

import httpx
import pytest

from nlcli.engine.args import ServerArgs
from nlcli.engine.serve_banner import exposure_warning
from tests.test_scheduler_fakes import LiveServer

HANG = 7  # a prompt token that makes the fake forward sleep NL_FAKE_HANG_SECONDS per copy


def test_exposure_warning_for_every_non_loopback_host_without_a_user_key():
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "fe80::1", "example.com"):
        warning = exposure_warning(ServerArgs(host=host))
        assert warning and host in warning and "--api-key" in warning
        assert exposure_warning(ServerArgs(host=host, api_key="k")) is None
        # An admin key alone leaves generation open to anyone who can reach the port.
        assert exposure_warning(ServerArgs(host=host, admin_api_key="k"))
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(ServerArgs(host=host)) is None


@pytest.mark.slow
def test_a_hung_step_dumps_stacks_turns_unhealthy_then_recovers_or_is_killed(tmp_path):
    # Binding every interface without a key must keep working (the brief does it), loudly.
    srv = LiveServer(str(tmp_path), ["--watchdog-timeout", "2", "--host", "0.0.0.0"],
                     env={"NL_FAKE_HANG_TOKEN": str(HANG), "NL_FAKE_HANG_SECONDS": "3.2"})
    try:
        assert "WARNING" in srv.log() and "0.0.0.0" in srv.log()

        async def hung_once():
            async with httpx.AsyncClient(timeout=60) as c:
                req = asyncio.create_task(c.post(srv.url + "/generate", json={
                    "input_ids": [HANG, 72, 105], "sampling_params": {"max_new_tokens": 4}}))
                seen = []
                while not req.done():
                    seen.append((await c.get(srv.url + "/health")).status_code)
                    await asyncio.sleep(0.1)
                return await req, seen

        r, seen = asyncio.run(hung_once())
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
        assert seen[0] == 200 and 503 in seen
        log = srv.log()
        assert "Watchdog timeout" in log
        assert "Thread 0x" in log and "in forward" in log  # faulthandler's dump of every thread
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never healthy again after the step ended"
            time.sleep(0.2)

        # A step that runs past twice the timeout is hung for good: the engine is killed, its
        # request fails fast with a 5xx and the server exits non-zero.
        t0 = time.monotonic()
        try:
            status = httpx.post(srv.url + "/generate", timeout=60, json={
                "input_ids": [HANG] * 10 + [65], "sampling_params": {"max_new_tokens": 4}}).status_code
        except httpx.HTTPError:
            status = None  # the server may close the connection while exiting
        assert status is None or status >= 500
        assert time.monotonic() - t0 < 15
        assert srv.proc.wait(30) == 1
        assert "killing the engine" in srv.log()
    finally:
        srv.stop(signal.SIGKILL)
