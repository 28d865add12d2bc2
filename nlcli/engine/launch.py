"""launch_server: start the engine process and the HTTP server, warm up, serve, shut down cleanly.

Exit codes: 0 after a signal-initiated shutdown, 1 when the engine fails to start, dies, or the
warm-up generation fails. On SIGTERM/Ctrl-C the server goes unready (/health 503), refuses new
work, lets in-flight requests finish for up to --shutdown-timeout seconds, aborts the rest, then
stops the engine; a second signal exits at once. No child process outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile

import uvicorn

from nlcli.engine.engine_process import configure_logging, run_engine

logger = logging.getLogger("nlcli.launch")

ENGINE_START_TIMEOUT = 1800.0
WARMUP_TEXT = "The capital city of France is"

_serving = {"started": False}


def _install_signal_handlers() -> None:
    """Before serving a signal stops start-up; after, uvicorn has handled it (it re-raises the
    signal once it has drained, which must not kill us before the engine is stopped)."""

    def on_signal(sig, frame):
        if not _serving["started"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


class _Server(uvicorn.Server):
    """uvicorn.Server that marks the tokenizer manager as draining on the first signal."""

    tm = None

    def handle_exit(self, sig, frame):
        if self.tm is not None and self.tm.start_draining():
            logger.info("Shutting down: draining in-flight requests (up to %.0f s)",
                        self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)


def _embedding_only(source) -> bool:
    from nlcli.engine.models.registry import is_embedding_only

    try:
        return is_embedding_only(getattr(source.hf_config(), "architectures", None) or [])
    except Exception:  # an unreadable config fails later with its own message
        return False


def launch_server(args) -> int:
    args = args.with_seed()
    configure_logging(args.log_level, "")
    from nlcli.engine.configs.model_source import resolve_model_source

    try:
        source = resolve_model_source(args.model_path, args.is_embedding, args.revision,
                                      args.download_dir)
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
    for flag in args.ignored_flags():
        logger.warning("%s is accepted for SGLang compatibility only and has no effect in nl.", flag)
    if args.host in ("0.0.0.0", "::") and not args.api_key:
        logger.warning("Listening on all interfaces without --api-key: anyone on the network can "
                       "use this server.")
    ipc_dir = tempfile.mkdtemp(prefix="nl-ipc-")
    in_addr, out_addr = f"ipc://{ipc_dir}/in", f"ipc://{ipc_dir}/out"
    proc = mp.get_context("spawn").Process(target=run_engine, args=(args, in_addr, out_addr),
                                           name="nl-engine")
    proc.start()
    _install_signal_handlers()
    try:
        return asyncio.run(_serve(args, source, proc, in_addr, out_addr))
    except KeyboardInterrupt:
        return 130
    finally:
        _stop_engine(proc)
        shutil.rmtree(ipc_dir, ignore_errors=True)


async def _serve(args, source, proc, in_addr: str, out_addr: str) -> int:
    from nlcli.engine.api.http_server import create_app
    from nlcli.engine.api.http_protocol import uvicorn_settings
    from nlcli.engine.api.tokenizer_manager import TokenizerManager

    tokenizer = await asyncio.to_thread(source.load_tokenizer, args.tokenizer_path)
    tm = TokenizerManager(args, tokenizer, in_addr, out_addr)
    try:
        ready = await tm.wait_ready(proc.is_alive, ENGINE_START_TIMEOUT)
    except RuntimeError as e:
        logger.error("%s", e)
        return 1
    model_info = {"model_path": args.model_path, "is_generation": ready.is_generation}
    app = create_app(args, tm, model_info)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                            log_level=args.log_level_http or "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            **uvicorn_settings(args))
    server = _Server(config)
    server.tm = tm
    _serving["started"] = True
    state = {"exit_code": 0}

    def on_dead() -> None:
        state["exit_code"] = 1
        server.should_exit = True

    tm.start(proc.is_alive, on_dead)
    warm = asyncio.create_task(_warmup(args, server, tm, ready, state))
    await server.serve()
    warm.cancel()
    # Whatever is still in flight after the graceful window is aborted with a reason.
    tm.shutdown("The server is shutting down.")
    return state["exit_code"]


async def _warmup(args, server, tm, ready, state) -> None:
    import httpx

    while not server.started:
        await asyncio.sleep(0.05)
    url = f"http://{_client_host(args.host)}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"text": WARMUP_TEXT, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    try:
        async with httpx.AsyncClient(timeout=600, headers=headers) as client:
            if ready.is_generation:
                r = await client.post(url + "/generate", json=body)
            else:
                r = await client.post(url + "/encode", json={"text": WARMUP_TEXT})
            r.raise_for_status()
    except Exception as e:
        logger.error("Warm-up request failed: %s", e)
        state["exit_code"] = 1
        server.should_exit = True
        return
    logger.info("The server is fired up and ready to roll!")
    _print_panel(url, args, ready)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _print_panel(url: str, args, ready) -> None:
    from rich.console import Console
    from rich.panel import Panel

    lines = [f"URL            {url}", f"Model          {args.model_path}",
             f"Device / dtype {ready.device} / {ready.dtype}",
             f"KV pool        {ready.max_total_num_tokens} tokens",
             f"Max context    {ready.context_len} tokens"]
    Console(stderr=True).print(Panel("\n".join(lines), title="nl serve", expand=False))


def _stop_engine(proc, timeout: float = 10.0) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if proc.exitcode not in (0, None):
        logger.info("Engine process exited with code %s", proc.exitcode)
    sys.stderr.flush()
