"""launch_server: start the engine process and the HTTP server, warm up, serve, shut down cleanly.

Shutdown on SIGTERM/Ctrl-C: the server goes unready (/health 503) and answers new work with 503
while the listener stays open; in-flight requests get up to --shutdown-timeout seconds to finish.
Those still running then are aborted through their normal output path (a stream's last event has
finish_reason `abort` with a message, then `[DONE]`; a non-streaming request gets a 503 in its
route's error envelope), and only then is uvicorn told to exit and the engine stopped and reaped.
A second signal skips the wait: everything in flight is aborted at once.

Exit codes: 0 after a signal when every request finished in time; EXIT_ABORTED (3) after a
signal when some had to be aborted; 1 when the engine fails to start, dies, or the warm-up
generation fails.

With --tp-size > 1 the engine is several processes (ranks), `tp_size / nnodes` of them on this
node; any one exiting is engine death. On --node-rank > 0 no HTTP server runs: `nl serve` only
starts this node's ranks and exits when they do (node 0 gone, or a signal), non-zero on failure.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Optional

import uvicorn

from nlcli.engine.distributed.node import (all_alive, dist_addr, follow_node, stop_ranks,
                                          topology_error)
from nlcli.engine.distributed.worker import run_tp_worker
from nlcli.engine.engine_process import configure_logging, run_engine
from nlcli.engine.serve_banner import client_host, exposure_warning, print_panel

logger = logging.getLogger("nlcli.launch")

ENGINE_START_TIMEOUT = 1800.0
WARMUP_TEXT = "The capital city of France is"
# `nl serve` exit code after a signal when requests still running at the deadline were aborted.
EXIT_ABORTED = 3
# Seconds uvicorn gets to write the last responses once nl has ended every request.
FLUSH_TIMEOUT = 10.0
# Seconds /health answers 503 after the engine died, before the server exits (so a load
# balancer's probe sees why it goes).
DEAD_GRACE = 1.0

_serving = {"started": False, "since": time.monotonic()}


def _install_signal_handlers() -> None:
    """Before serving a signal stops start-up; after, uvicorn has handled it (it re-raises the
    signal once it has drained, which must not kill us before the engine is stopped)."""

    def on_signal(sig, frame):
        if not _serving["started"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals start nl's drain (_drain_on_signal) instead of stopping
    uvicorn: the listener stays open so new requests get a clear 503, not a refused connection."""

    def __init__(self, config, tm, shutdown_timeout: float):
        super().__init__(config)
        self.tm, self.shutdown_timeout, self.signals = tm, shutdown_timeout, 0

    def handle_exit(self, sig, frame):
        self.signals += 1
        if self.signals == 1:
            self.tm.start_draining()
            logger.info("Shutting down: draining in-flight requests (up to %.0f s; signal again "
                        "to abort them now)", self.shutdown_timeout)
        elif self.signals == 2:
            logger.warning("Second signal: aborting every request in flight and exiting now")
        if self.signals > 1 and self.should_exit:
            self.force_exit = True  # already flushing the last responses: stop waiting


async def _drain_on_signal(server: _Server, tm, state: dict) -> None:
    """After the first signal: drain and abort (api/shutdown.py; a second signal hurries it),
    then let uvicorn exit, which now only writes the last responses."""
    from nlcli.engine.api.shutdown import drain

    while not server.signals:
        if server.should_exit:  # the engine died or the warm-up failed
            return
        await asyncio.sleep(0.05)
    if await drain(tm, server.shutdown_timeout, lambda: server.signals > 1) and not state["exit_code"]:
        state["exit_code"] = EXIT_ABORTED
    server.should_exit = True


def _embedding_only(source) -> bool:
    from nlcli.engine.models.registry import is_embedding_only

    try:
        return is_embedding_only(source.architectures())
    except Exception:  # an unreadable config fails later with its own message
        return False


def launch_server(args) -> int:
    _serving["since"] = time.monotonic()
    configure_logging(args.log_level, "")
    try:
        args = args.with_seed().with_secrets()
    except ValueError as e:
        logger.error("%s", e)
        return 1
    refused = args.refused_flags()
    for flag in refused:
        logger.error("%s cannot be honoured; not starting.", flag)
    if refused:
        return 2
    topology = topology_error(args)
    if topology:
        logger.error("%s; not starting.", topology)
        return 2
    from nlcli.engine.configs.config_overrides import parse_model_overrides
    from nlcli.engine.configs.model_source import resolve_model_source

    try:
        overrides = parse_model_overrides(args.json_model_override_args)
        source = resolve_model_source(args.model_path, args.is_embedding, args.revision,
                                      args.download_dir, overrides)
    except Exception as e:  # the message says what to do; no traceback for a bad path
        logger.error("%s", e)
        return 1
    if args.model_path is None:
        args = args.replace(model_path=source.model_path)
    if not args.is_embedding and _embedding_only(source):
        # An encoder or a reward head has nothing to generate with: serve it the only way it can be.
        logger.info("%s is an embedding/reward model; serving it as with --is-embedding", args.model_path)
        args = args.replace(is_embedding=True)
    logger.info("server_args=%r", args)
    if args.node_rank > 0:  # no HTTP here: this node's ranks only, until they exit
        procs = start_engine(args, None, None)
        _install_signal_handlers()
        return follow_node(args, procs)
    for flag in args.ignored_flags():
        logger.warning("%s is accepted for SGLang compatibility only and has no effect in nl.", flag)
    warning = exposure_warning(args)
    if warning:  # loud on purpose, but serving on 0.0.0.0 without a key must keep working
        for line in ("!" * 78, "WARNING: " + warning, "!" * 78):
            logger.warning("%s", line)
    ipc_dir = tempfile.mkdtemp(prefix="nl-ipc-")
    # One engine group per --dp-size, each on its own pair of sockets.
    in_addrs = [f"ipc://{ipc_dir}/in{g}" for g in range(args.dp_size)]
    out_addrs = [f"ipc://{ipc_dir}/out{g}" for g in range(args.dp_size)]
    procs: list = []
    _install_signal_handlers()
    try:
        for g in range(args.dp_size):
            procs += start_engine(args, in_addrs[g], out_addrs[g], dp_rank=g)
        return asyncio.run(_serve(args, source, procs, in_addrs, out_addrs))
    except KeyboardInterrupt:
        return 130
    finally:
        if not all(p.is_alive() for p in procs):  # a group died: stop the others now
            for proc in [p for p in procs if p.is_alive()]:
                proc.terminate()
        stop_ranks(procs)
        shutil.rmtree(ipc_dir, ignore_errors=True)


def start_engine(args, in_addr: Optional[str], out_addr: Optional[str],
                 dp_rank: int = 0) -> list[BaseProcess]:
    """Spawn this node's ranks of one engine group (DP rank `dp_rank`): rank 0 (sockets and
    scheduler) on node 0, followers (distributed/worker.py) for the others. Returns the started
    processes."""
    ctx = mp.get_context("spawn")
    per_node = args.tp_size // args.nnodes
    addr = dist_addr(args, dp_rank) if args.tp_size > 1 else None
    group = "" if args.dp_size == 1 else f"-dp{dp_rank}"
    procs = []
    for rank in range(args.node_rank * per_node, (args.node_rank + 1) * per_node):
        if rank == 0:
            proc = ctx.Process(target=run_engine, args=(args, in_addr, out_addr, dp_rank, addr),
                               name=f"nl-engine{group}")
        else:
            proc = ctx.Process(target=run_tp_worker, args=(args, rank, addr),
                               name=f"nl-engine{group}-tp{rank}")
        proc.start()
        procs.append(proc)
    return procs


async def _serve(args, source, procs: list, in_addrs: list[str], out_addrs: list[str]) -> int:
    from nlcli.engine.api.http_protocol import uvicorn_settings
    from nlcli.engine.api.http_server import create_app
    from nlcli.engine.api.tokenizer_manager import TokenizerManager

    tokenizer = None if args.skip_tokenizer_init else await asyncio.to_thread(
        source.load_tokenizer, args.tokenizer_path)
    tm = TokenizerManager(args, tokenizer, in_addrs, out_addrs)
    alive = functools.partial(all_alive, procs)
    try:
        ready = await tm.wait_ready(alive, ENGINE_START_TIMEOUT)
    except RuntimeError as e:
        logger.error("%s", e)
        return 1
    model_info = {"model_path": args.model_path, "is_generation": ready.is_generation}
    app = create_app(args, tm, model_info)
    # By the time uvicorn is told to exit, nl has ended every request; uvicorn only flushes.
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                            log_level=args.log_level_http or "warning",
                            timeout_graceful_shutdown=FLUSH_TIMEOUT, **uvicorn_settings(args))
    server = _Server(config, tm, args.shutdown_timeout)
    _serving["started"] = True
    state = {"exit_code": 0}

    def on_dead() -> None:
        state["exit_code"] = 1
        asyncio.get_running_loop().call_later(DEAD_GRACE, setattr, server, "should_exit", True)

    tm.start(alive, on_dead)
    warm = asyncio.create_task(_warmup(args, server, tm, ready, state))
    drain = asyncio.create_task(_drain_on_signal(server, tm, state))
    await server.serve()
    warm.cancel()
    drain.cancel()
    tm.shutdown("The server is shutting down.")  # nothing is left unless the engine died
    await asyncio.sleep(0.05)  # let the ShutdownReq leave before the loop closes
    return state["exit_code"]


async def _warmup(args, server, tm, ready, state) -> None:
    import httpx

    while not server.started:
        await asyncio.sleep(0.05)
    if tm.metrics is not None:
        tm.metrics.set_startup_time("tokenizer_e2e", time.monotonic() - _serving["since"])
    if (args.log_level_http or "warning") not in ("debug", "info", "trace"):
        # uvicorn's own line (it logs it only at info); tools wait for it.
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"INFO:     Uvicorn running on http://{host}:{args.port} (Press CTRL+C to quit)",
              file=sys.stderr, flush=True)
    url = f"http://{client_host(args.host)}:{args.port}"
    key = args.api_key or args.admin_api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"text": WARMUP_TEXT, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    if args.skip_tokenizer_init:  # no tokenizer: a few ids inside any vocabulary instead
        body = {"input_ids": list(range(min(8, ready.vocab_size or 8))),
                "sampling_params": body["sampling_params"]}
    try:
        async with httpx.AsyncClient(timeout=600, headers=headers) as client:
            if ready.is_generation:
                r = await client.post(url + "/generate", json=body)
            else:
                r = await client.post(url + "/encode", json={"text": WARMUP_TEXT} if tm.tokenizer
                                      else {"input_ids": body["input_ids"]})
            r.raise_for_status()
    except Exception as e:
        if server.signals:  # shutting down before the warm-up finished: nothing failed
            return
        logger.error("Warm-up request failed: %s", e)
        state["exit_code"] = 1
        server.should_exit = True
        return
    logger.info("The server is fired up and ready to roll!")
    print_panel(url, args, ready)
