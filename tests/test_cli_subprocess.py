"""`nl` as scripts run it: a real process, pipes, signals, environment variables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.app_server import (  # noqa: F401  (fixtures)
    TEST_API_KEY,
    AppServer,
    auth_server_url,
    free_port,
    server_url,
)

NL = str(Path(sys.executable).with_name("nl"))
COLOR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])(?:;[0-9;]*)?m")


def run(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 60):
    base = {k: v for k, v in os.environ.items()
            if k not in ("NL_URL", "NL_API_KEY", "NO_COLOR", "FORCE_COLOR")}
    return subprocess.run([NL, *args], input=input, capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


def test_piped_prompt_gives_parseable_json(server_url):
    r = run("generate", "--json", "--max-new-tokens", "8", input="hi\n",
            env={"NL_URL": server_url})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["text"], str) and out["meta_info"]["completion_tokens"] >= 1


def test_human_output_goes_to_stderr_when_piped(server_url):
    r = run("health", "--url", server_url)
    assert r.returncode == 0 and r.stdout == "" and "healthy" in r.stderr


def test_exit_codes_unreachable_and_unauthorized(auth_server_url):
    r = run("generate", "hi", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert r.returncode == 3, r.stderr
    r = run("generate", "hi", "--url", auth_server_url, "--api-key", "not-" + TEST_API_KEY)
    assert r.returncode == 5
    assert TEST_API_KEY not in r.stdout + r.stderr


def test_health_wait_until_a_starting_server_is_up():
    port = free_port()
    proc = subprocess.Popen([NL, "health", "--wait", "30", "--url", f"http://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting: nothing listens yet
    with AppServer(port=port):
        assert proc.wait(timeout=30) == 0


def test_health_unhealthy_exits_4_and_never_up_exits_3():
    with AppServer() as srv:
        srv.tm.start_draining()  # shutting down: alive, but /health and /health_generate say 503
        r = run("health", "--generate", "--wait", "1", "--url", srv.url, "--json")
        assert r.returncode == 4
        out = json.loads(r.stdout)
        assert out == {"ok": False, "status": 503, "error": out["error"]}
    r = run("health", "--wait", "1", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3


@pytest.mark.skipif(os.name != "posix", reason="needs SIGINT")
def test_ctrl_c_while_streaming_exits_130():
    with AppServer(step_delay=0.5) as srv:
        proc = subprocess.Popen([NL, "generate", "hi", "--url", srv.url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout.read(1)  # streaming has begun
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130


def test_no_color_is_respected(server_url):
    url = f"http://127.0.0.1:{free_port()}"
    colored = run("health", "--url", url, env={"FORCE_COLOR": "1"})
    plain = run("health", "--url", url, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert colored.returncode == plain.returncode == 3
    assert COLOR_SGR.search(colored.stderr)  # the check can see colour when there is some
    assert not COLOR_SGR.search(plain.stderr)
