"""nl behind SGLang's own router: `sglang-router` (the registry package, cache_aware policy) in
front of two `nl serve` workers on loopback lists both healthy and serves /generate and
/v1/chat/completions with the workers' own answers.

The router is a 30 MB wheel (89 MB installed) with its own dependency pins, so it lives in a
separate venv, made by scripts/setup_sglang_router.sh (.venv-router), or named by
NL_SGLANG_ROUTER_PYTHON; without it this test is skipped and says so."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import httpx
import pytest

from nlcli.engine.distributed.node import free_port
from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _router_python() -> str:
    python = os.environ.get("NL_SGLANG_ROUTER_PYTHON") or os.path.join(ROOT, ".venv-router", "bin",
                                                                      "python")
    if not os.path.exists(python):
        pytest.skip("sglang-router is not installed: run scripts/setup_sglang_router.sh (a separate "
                    "venv, .venv-router) or set NL_SGLANG_ROUTER_PYTHON to a python that has it")
    return python


@pytest.fixture(scope="module")
def router(tmp_path_factory, tiny_model_dir):
    python = _router_python()
    model = tiny_model_dir("llama")
    workers: list[LiveServer] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            workers.append(LiveServer(str(tmp_path_factory.mktemp("worker")), model_path=model))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc = None
    try:
        if errors:
            raise errors[0]
        port = free_port()
        log = open(tmp_path_factory.mktemp("router") / "router.log", "w")
        proc = subprocess.Popen(
            [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
             str(port), "--policy", "cache_aware", "--prometheus-port", str(free_port()),
             "--worker-urls", *[w.url for w in workers]], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                listed = httpx.get(url + "/workers", timeout=5).json()["workers"]
                if len(listed) == 2 and all(w["is_healthy"] for w in listed):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.5)
        yield url, workers, listed
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        for w in workers:
            w.stop()


def test_router_lists_both_workers_healthy(router):
    url, workers, listed = router
    assert sorted(w["url"] for w in listed) == sorted(w.url for w in workers)


def test_generate_and_chat_through_the_router(router):
    url, workers, _ = router
    body = {"text": "The capital city of France is", "sampling_params": {"max_new_tokens": 6,
                                                                         "temperature": 0}}
    direct = httpx.post(workers[0].url + "/generate", json=body, timeout=60).json()
    for _ in range(3):  # cache_aware sends repeats of one prompt to one worker; all answer alike
        r = httpx.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == direct["output_ids"]
    chat = {"model": workers[0].model_path, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi"}]}
    direct = httpx.post(workers[1].url + "/v1/chat/completions", json=chat, timeout=60).json()
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    # Streaming through the router too.
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data:")]
    assert s.status_code == 200 and lines[-1] == "data: [DONE]"
