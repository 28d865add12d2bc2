"""The engine process: load the model runner, then loop receive -> schedule -> forward -> send.

Started by launch.py with multiprocessing's spawn context. It reports `EngineReady` once the pools
exist, sends a Heartbeat about once a second, exits when its parent dies, and a watchdog thread
dumps every thread's stack and kills the process if one step outlives --watchdog-timeout.
`NL_TEST_RUNNER=module:Factory` swaps in a fake runner for tests of the serving layers.
With --tp-size > 1 this process is TP rank 0: it joins the group at `dist_addr` first, announces
every model op to the other ranks (distributed/step_sync.py), pings them each heartbeat, and exits
non-zero when the group breaks (a rank died), which the API process reports as engine death.
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
import time

HEARTBEAT_INTERVAL = 1.0
GRAMMAR_POLL_MS = 5


def configure_logging(level: str, prefix: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"[%(asctime)s{prefix}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        force=True)


def _make_runner(server_args):
    factory = os.environ.get("NL_TEST_RUNNER")
    if factory:
        module, _, attr = factory.partition(":")
        return getattr(importlib.import_module(module), attr)(server_args)
    from nlcli.engine.model_executor.model_runner import ModelRunner

    return ModelRunner(server_args)


def _place_dp_group(server_args, dp_rank: int, log):
    """--dp-size groups on one machine: group g on GPU g when there is a GPU per group (as SGLang
    places them); otherwise the groups share the device, each sizing its KV pool from 1/dp_size
    of the memory fraction (they measure the same free memory at the same time)."""
    if server_args.dp_size == 1:
        return server_args
    import torch

    # With --tp-size > 1 each rank picks its GPU by TP rank (parallel_state), so groups share GPUs.
    if (server_args.tp_size == 1 and server_args.device in ("auto", "cuda") and torch.cuda.is_available()
            and torch.cuda.device_count() >= server_args.dp_size):
        torch.cuda.set_device(dp_rank)
        return server_args
    if server_args.max_total_tokens or server_args.mem_fraction_static:
        return server_args  # set by the user: taken as meant for each group
    shared = torch.cuda.is_available() and server_args.device != "cpu"
    # ModelRunner's defaults (0.88 of a GPU, 0.25 of CPU memory), split between the groups.
    fraction = (0.88 if shared else 0.25) / server_args.dp_size
    log.info("DP group %d shares the device: KV pool from %.3f of free memory", dp_rank, fraction)
    return server_args.replace(mem_fraction_static=fraction)


def _preload_tokenizer(sched, log) -> None:
    """Stop strings and grammars need the tokenizer in the engine; load it before serving."""
    try:
        sched.tokenizer
    except Exception as e:  # a fake runner's dir may have none; such requests then fail alone
        log.warning("No tokenizer in the engine (stop strings and grammars unavailable): %s", e)


def _tensor_bytes(pool) -> int:
    """Bytes of the tensors a KV pool holds (its K and V buffers per layer)."""
    import torch

    total = 0
    for value in vars(pool).values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _Watchdog(threading.Thread):
    """Soft at `timeout`: one step that long dumps every thread's stack to the log (the API sees
    no heartbeat, so /health is 503 until the step ends). Hard at twice that: the step is taken
    to be hung for good, and the engine exits, which fails its requests and stops the server."""

    def __init__(self, timeout: float):
        super().__init__(daemon=True, name="nl-watchdog")
        self.timeout = timeout
        self.step_started: float | None = None

    def run(self) -> None:
        log = logging.getLogger("nlcli.scheduler")
        reported = None  # the start time of the step already dumped
        while True:
            time.sleep(min(self.timeout / 4, 5.0))
            started = self.step_started
            if started is None:
                continue
            took = time.monotonic() - started
            if took > 2 * self.timeout:
                log.error("Watchdog: one step has run %.1f s (twice --watchdog-timeout); killing "
                          "the engine", took)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(1)
            if took > self.timeout and reported != started:
                reported = started
                log.error("Watchdog timeout (self.watchdog_timeout=%s): one step has run %.1f s; "
                          "the stack of every thread follows", self.timeout, took)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def _join_tp_group(server_args, dist_addr, log) -> None:
    from nlcli.engine.distributed.parallel_state import check_same_args, init_tp_group

    try:
        init_tp_group(dist_addr, 0, server_args.tp_size, server_args.device, server_args.dist_timeout)
        check_same_args(server_args)
    except Exception as e:
        log.error("%s", e)
        sys.exit(1)


def run_engine(server_args, in_addr: str, out_addr: str, dp_rank: int = 0,
               dist_addr: str | None = None) -> None:
    # Ctrl-C reaches the whole process group: the API process handles it and stops us with a
    # ShutdownReq (or SIGTERM), so the engine must not die mid-step with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import zmq

    from nlcli.engine.distributed.step_sync import TPGroupError
    from nlcli.engine.io_struct import EngineReady, ShutdownReq
    from nlcli.engine.scheduler.books import MemoryLeakError
    from nlcli.engine.scheduler.scheduler import Scheduler

    configure_logging(server_args.log_level,
                      f" DP{dp_rank} TP0" if server_args.dp_size > 1 else " TP0")
    log = logging.getLogger("nlcli.engine")
    parent = os.getppid()
    if server_args.tp_size > 1:
        _join_tp_group(server_args, dist_addr, log)
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(in_addr)
    send = ctx.socket(zmq.PUSH)
    # A PUSH with no peer blocks forever; time out so a dead API process is noticed.
    send.setsockopt(zmq.SNDTIMEO, 2000)
    send.bind(out_addr)

    def send_obj(obj: object) -> None:
        while True:
            try:
                send.send_pyobj(obj)
                return
            except zmq.Again:
                if os.getppid() != parent:
                    log.error("API process is gone; engine exiting")
                    os._exit(1)

    started = time.monotonic()
    try:
        server_args = _place_dp_group(server_args, dp_rank, log)
        runner = _make_runner(server_args)
        runner.warmup()
        sched = Scheduler(server_args, runner, send_obj)
        if runner.model_config.is_generation and not server_args.skip_tokenizer_init:
            _preload_tokenizer(sched, log)
    except Exception:
        log.exception("Engine failed to start")
        sys.exit(1)
    tp_leader = getattr(runner, "tp_leader", None)  # None: one rank (or a test's fake runner)
    cfg = runner.model_config
    log.info("max_total_num_tokens=%d, max_prefill_tokens=%d, max_running_requests=%d, context_len=%d",
             runner.max_total_num_tokens, sched.max_prefill_tokens,
             sched.max_running_requests, cfg.context_len)
    send_obj(EngineReady(
        max_total_num_tokens=int(runner.max_total_num_tokens),
        max_prefill_tokens=sched.max_prefill_tokens,
        max_running_requests=sched.max_running_requests, context_len=int(cfg.context_len),
        device=str(runner.device), dtype=str(runner.dtype).replace("torch.", ""),
        is_generation=bool(cfg.is_generation),
        vocab_size=int(cfg.vocab_size), eos_token_ids=list(cfg.eos_token_ids or []),
        weight_memory_gb=getattr(runner, "weight_bytes", 0) / 2**30,
        kv_cache_memory_gb=_tensor_bytes(runner.token_to_kv_pool) / 2**30,
        startup_seconds={**getattr(runner, "startup_seconds", {}),
                         "scheduler_e2e": time.monotonic() - started}))
    watchdog = _Watchdog(server_args.watchdog_timeout)
    watchdog.start()
    poller = zmq.Poller()
    poller.register(recv, zmq.POLLIN)
    last_beat = 0.0
    while True:
        # Block on the socket when idle (no spinning); wake briefly while a grammar compiles.
        if sched.can_run:
            timeout = 0
        elif sched.has_work:
            timeout = GRAMMAR_POLL_MS
        else:
            timeout = int(HEARTBEAT_INTERVAL * 1000)
        if poller.poll(timeout):
            while True:
                try:
                    msg = recv.recv_pyobj(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if isinstance(msg, ShutdownReq):
                    log.info("Engine shutting down")
                    if tp_leader is not None:
                        tp_leader.shutdown()
                        from nlcli.engine.distributed.parallel_state import destroy_tp_group

                        destroy_tp_group()
                    return
                sched.handle(msg)
        watchdog.step_started = time.monotonic()
        try:
            sched.step()
        except MemoryLeakError:
            raise  # tests make a leak fatal on purpose
        except TPGroupError as e:  # a rank died: this group cannot compute any more
            log.error("%s; engine exiting", e)
            sys.exit(1)
        except Exception as e:  # one bad batch must not take the server down
            log.exception("A scheduler step failed")
            n = sched.fail_in_flight(f"{type(e).__name__}: {e}")
            log.error("Failed %d in-flight request(s); the engine keeps serving", n)
        watchdog.step_started = None
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_INTERVAL:
            last_beat = now
            if os.getppid() != parent:
                log.error("API process is gone; engine exiting")
                return
            if tp_leader is not None:  # also keeps the ranks' waits under --dist-timeout
                try:
                    tp_leader.ping()
                except TPGroupError as e:
                    log.error("%s; engine exiting", e)
                    sys.exit(1)
            send_obj(sched.heartbeat())
