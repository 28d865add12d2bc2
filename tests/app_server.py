"""The real HTTP app on a fake engine, in the test process, and the fixtures the CLI tests use.

`AppServer` runs what `nl serve` runs, minus the model: `create_app` with a real TokenizerManager
(byte-level tokenizer) under uvicorn, talking over ZMQ to the real Scheduler on a fake model runner
in a thread. The runner writes one fixed sentence, a byte per token, then EOS: enough words for
stop strings, and real prefix caching, flushes, validation, API key and weight-update refusals.
`--is-embedding` servers get a runner whose pooled vector hashes the input. Fixtures
`server_url`, `auth_server_url`, `embed_server_url`; `NL_TEST_SERVER_URL` points `server_url` at
a running `nl serve` instead.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from typing import Any, Optional

import pytest
import torch
import uvicorn

from nlcli.engine.args import ServerArgs
from nlcli.engine.distributed.node import free_port
from nlcli.engine.layers.pooler import EmbeddingPoolerOutput
from tests.test_scheduler_fakes import EOS_ID, FakeModelRunner, write_byte_tokenizer

SENTENCE = b"The capital of France is Paris."
TEST_API_KEY = "sk-test-secret-7f3a"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
EMBED_DIM = 16


def _sentence_token(context: list[int]) -> int:
    """The next byte of SENTENCE after the longest part of it the context already ends with."""
    tail = bytes(t for t in context[-len(SENTENCE):] if t < 256)
    done = next(k for k in range(len(SENTENCE), -1, -1) if tail.endswith(SENTENCE[:k]))
    return EOS_ID if done == len(SENTENCE) else SENTENCE[done]


class SentenceRunner(FakeModelRunner):
    next_token = staticmethod(_sentence_token)

    def __init__(self, server_args=None, **kw: Any):
        super().__init__(server_args, **kw)
        self.server_args = server_args  # a weight update reads it (and then refuses the fake)


class HashEmbeddingRunner(SentenceRunner):
    """Pools each request's whole context into EMBED_DIM numbers (a hash, stable per input)."""

    def __init__(self, server_args=None, **kw: Any):
        super().__init__(server_args, **kw)
        self.model_config.is_generation = False

    def forward(self, batch):
        kv, r2t = self.token_to_kv_pool.kv, self.req_to_token_pool.req_to_token
        kv[batch.out_cache_loc] = batch.input_ids
        rows = []
        for i in range(batch.batch_size):
            ctx = kv[r2t[int(batch.req_pool_indices[i]), :batch.seq_lens_cpu[i]]].tolist()
            rows.append([((hash(tuple(ctx)) >> (4 * d)) % 255 - 127) / 128 for d in range(EMBED_DIM)])
        return EmbeddingPoolerOutput(embeddings=torch.tensor(rows))


def model_dir() -> str:
    """A byte-level tokenizer and config (built once per process), as `--model-path`."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        from safetensors.torch import save_file

        _MODEL_DIR = write_byte_tokenizer(os.path.join(tempfile.mkdtemp(prefix="nl-app-"), "model"))
        save_file({"unused": torch.zeros(1)}, os.path.join(_MODEL_DIR, "model.safetensors"))
        with open(os.path.join(_MODEL_DIR, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
    return _MODEL_DIR


_MODEL_DIR: Optional[str] = None


class AppServer:
    """`with AppServer(...) as srv:` serves on srv.url until the block ends."""

    def __init__(self, port: Optional[int] = None, step_delay: float = 0.0, **args: Any):
        path = model_dir()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ServerArgs(model_path=path, port=self.port, context_length=512,
                               chat_template=os.path.join(path, "chat_template.jinja"),
                               **args).with_seed()
        runner_cls = HashEmbeddingRunner if self.args.is_embedding else SentenceRunner
        self.runner = runner_cls(self.args)
        self.runner.step_delay = step_delay
        ipc = tempfile.mkdtemp(prefix="nl-app-ipc-")
        self.in_addr, self.out_addr = f"ipc://{ipc}/in", f"ipc://{ipc}/out"
        self.tm: Any = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the app's event loop, once serving
        self._server: Optional[uvicorn.Server] = None
        self._engine_stop = threading.Event()
        self._engine = threading.Thread(target=self._run_engine, daemon=True, name="fake-engine")
        self._http = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True,
                                      name="app-server")

    # ---- the engine: the real Scheduler on the fake runner -------------------------------------
    def _run_engine(self) -> None:
        import zmq

        from nlcli.engine.io_struct import EngineReady, ShutdownReq
        from nlcli.engine.scheduler.scheduler import Scheduler

        ctx = zmq.Context()
        recv, send = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        recv.bind(self.in_addr)
        send.bind(self.out_addr)
        sched = Scheduler(self.args, self.runner, send.send_pyobj)
        cfg = self.runner.model_config
        send.send_pyobj(EngineReady(
            max_total_num_tokens=self.runner.max_total_num_tokens,
            max_prefill_tokens=sched.max_prefill_tokens,
            max_running_requests=sched.max_running_requests, context_len=cfg.context_len,
            device="cpu", dtype="float32", is_generation=cfg.is_generation,
            vocab_size=cfg.vocab_size, eos_token_ids=list(cfg.eos_token_ids)))
        last_beat = 0.0
        try:
            while not self._engine_stop.is_set():
                if recv.poll(0 if sched.can_run else 50):
                    msg = recv.recv_pyobj()
                    if isinstance(msg, ShutdownReq):
                        return
                    sched.handle(msg)
                sched.step()
                if time.monotonic() - last_beat > 1.0:
                    last_beat = time.monotonic()
                    send.send_pyobj(sched.heartbeat())
        finally:
            recv.close(linger=0)
            send.close(linger=0)
            ctx.term()

    # ---- the API side: what launch.py runs -----------------------------------------------------
    async def _serve(self) -> None:
        from transformers import AutoTokenizer

        from nlcli.engine.api.http_protocol import uvicorn_settings
        from nlcli.engine.api.http_server import create_app
        from nlcli.engine.api.tokenizer_manager import TokenizerManager

        self.loop = asyncio.get_running_loop()
        tm = TokenizerManager(self.args, AutoTokenizer.from_pretrained(self.args.model_path),
                              self.in_addr, self.out_addr)
        ready = await tm.wait_ready(self._engine.is_alive, 60)
        app = create_app(self.args, tm, {"model_path": self.args.model_path,
                                         "is_generation": ready.is_generation})
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", **uvicorn_settings(self.args))
        self._server = uvicorn.Server(config)
        tm.start(self._engine.is_alive, lambda: setattr(self._server, "should_exit", True))
        self.tm = tm
        await self._server.serve()
        tm.shutdown("The server is shutting down.")
        await asyncio.sleep(0.05)  # let the ShutdownReq leave before the loop closes

    def start(self) -> "AppServer":
        self._engine.start()
        self._http.start()
        deadline = time.monotonic() + 60
        while self._server is None or not self._server.started:
            if time.monotonic() > deadline or not self._http.is_alive():
                self.stop()
                raise RuntimeError("the app server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._http.join(timeout=10)
        self._engine_stop.set()
        self._engine.join(timeout=10)

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def server_url() -> Any:
    """A generation server: the real app on the fake engine, or a running `nl serve` named by
    NL_TEST_SERVER_URL."""
    if os.environ.get("NL_TEST_SERVER_URL"):
        yield os.environ["NL_TEST_SERVER_URL"]
        return
    with AppServer() as srv:
        yield srv.url


@pytest.fixture(scope="session")
def auth_server_url() -> Any:
    """A generation server started with --api-key TEST_API_KEY."""
    with AppServer(api_key=TEST_API_KEY) as srv:
        yield srv.url


@pytest.fixture(scope="session")
def embed_server_url() -> Any:
    """An embedding server (--is-embedding)."""
    with AppServer(is_embedding=True) as srv:
        yield srv.url
