"""`nl serve --tp-size 2` as processes: one node, and two nodes (`--nnodes 2`, two `nl serve`
invocations on loopback). Greedy output equals one rank's; node 1 runs no HTTP server and exits
when node 0 goes; a rank that dies turns /health 503 within 5 s and the server exits non-zero
with nothing left behind; an unreachable --dist-init-addr fails with the address in the message.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from nlcli.engine.distributed.node import free_port
from tests.test_scheduler_fakes import LiveServer
from tests.test_server_lifecycle import _alive
from tests.tiny_models import EngineDriver, make_runner

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 12, 13]]
NEW_TOKENS = 8
NL = os.path.join(os.path.dirname(sys.executable), "nl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
SMALL = ["--max-total-tokens", "1024", "--max-running-requests", "8", "--dtype", "float32",
         "--device", "cpu"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny Llama and one rank's greedy continuation of PROMPTS."""
    path = tiny_model_dir("llama")
    return path, EngineDriver(make_runner(path)).generate_greedy(PROMPTS, NEW_TOKENS)


def _greedy(url: str) -> list[list[int]]:
    sp = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    return [httpx.post(url + "/generate", json={"input_ids": p, "sampling_params": sp},
                       timeout=120).json()["output_ids"] for p in PROMPTS]


def _rank_pid(log: str, rank: int) -> int:
    return int(re.search(rf"TP rank {rank} of \d+ \(pid (\d+)\)", log).group(1))


def test_one_node_tp2_serves_like_tp1_and_a_dead_rank_stops_it(tmp_path, model):
    path, want = model
    srv = LiveServer(str(tmp_path), ["--tp-size", "2", *SMALL], model_path=path)
    try:
        assert _greedy(srv.url) == want
        # Again, from the radix cache: a one-token extend over a prefix rank 0 just matched
        # (the other rank must get the row the match wrote).
        again = httpx.post(srv.url + "/generate", timeout=120, json={
            "input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "ignore_eos": True,
                                                         "max_new_tokens": NEW_TOKENS}}).json()
        assert again["meta_info"]["cached_tokens"] == len(PROMPTS[0]) - 1
        assert again["output_ids"] == want[0]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        everyone = srv.engine_pids()
        os.kill(_rank_pid(srv.log(), 1), signal.SIGKILL)
        start, status = time.monotonic(), 200
        while status == 200 and time.monotonic() - start < 5:
            status = httpx.get(srv.url + "/health", timeout=5).status_code
            time.sleep(0.05)
        assert status == 503, srv.log()
        assert srv.proc.wait(30) not in (0, None)
        time.sleep(0.5)
        assert not [pid for pid in everyone if _alive(pid)]
    finally:
        srv.stop(signal.SIGKILL)


def test_two_nodes_on_loopback_serve_like_one_rank(tmp_path, model):
    path, want = model
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr, *SMALL]
    node1_port = free_port()
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen([NL, "serve", "--model-path", path, "--port", str(node1_port),
                                  "--node-rank", "1", *flags], cwd=ROOT, env=ENV, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        node0 = LiveServer(str(tmp_path), ["--node-rank", "0", *flags], model_path=path)
        try:
            assert _greedy(node0.url) == want
            with pytest.raises(httpx.ConnectError):  # node 1 serves no HTTP
                httpx.get(f"http://127.0.0.1:{node1_port}/health", timeout=5)
            ranks = _children(node1.pid)
        finally:
            assert node0.stop(signal.SIGTERM) == 0
        assert node1.wait(30) == 0, (tmp_path / "node1.log").read_text()
        time.sleep(0.5)
        assert not [pid for pid in ranks if _alive(pid)]
    finally:
        if node1.poll() is None:
            node1.kill()


def test_an_unreachable_init_address_times_out_naming_it():
    # What a rank > 0 meets when node 0 never came; its process then logs this and exits 1.
    from nlcli.engine.distributed.parallel_state import init_tp_group

    addr = f"127.0.0.1:{free_port()}"  # nobody listens
    with pytest.raises(TimeoutError, match=f"could not join the group at {addr} within 1 s"):
        init_tp_group(addr, 1, 2, "cpu", 1)
