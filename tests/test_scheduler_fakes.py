"""A fake ModelRunner with real paging, for scheduler and server tests without model weights.

It follows docs/INTERFACES.md: the pools have the real interface, and `forward` writes each new
token id into a "KV buffer" at `out_cache_loc`, then reads every request's context back through
`req_to_token[row, :seq_len]`. The next token is a hash of that context, so any paging mistake
(a wrong slot, a freed slot reused while still cached) changes the output. `reference_greedy`
computes the same continuation without any paging: the oracle.

Its vocabulary matches `write_byte_tokenizer`: ids 0..255 are bytes, 256 is EOS.
"""

from __future__ import annotations

import itertools
import json
import os
from types import SimpleNamespace

import torch

from nlcli.engine.forward_batch import ForwardBatch, LogitsOutput

VOCAB = 260
EOS_ID = 256


class _FreeList:
    """Ids handed out in order; alloc answers None when too few are left, as the real pools do."""

    def __init__(self, ids):
        self._free = list(ids)

    def available_size(self) -> int:
        return len(self._free)

    def _take(self, n: int):
        if n > len(self._free):
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out


class FakeAllocator(_FreeList):
    def __init__(self, size: int):
        super().__init__(range(1, size + 1))
        self.size = size
        self._held: set[int] = set()

    def alloc(self, n: int):
        out = self._take(n)
        if out is None:
            return None
        self._held.update(out)
        return torch.tensor(out, dtype=torch.int64)

    def free(self, slots) -> None:
        for s in torch.as_tensor(slots).tolist():
            if s not in self._held:
                raise AssertionError(f"double free or foreign slot {s}")
            self._held.remove(s)
            self._free.append(s)


class FakeReqToTokenPool(_FreeList):
    def __init__(self, size: int, context_len: int):
        super().__init__(range(size))
        self.size = size
        self.req_to_token = torch.zeros((size, context_len), dtype=torch.int64)

    def alloc(self, n: int):
        return self._take(n)

    def free(self, rows) -> None:
        for r in rows:
            assert r not in self._free, f"row {r} freed twice"
            self._free.append(r)


def next_token(context: list[int]) -> int:
    h = 1469598103
    for i, t in enumerate(context):
        h = (h * 1099511 + (t + 1) * (i + 7)) % 2147483647
    # Printable ASCII most of the time, EOS now and then, a UTF-8 lead byte sometimes.
    if context and context[-1] == 0xC3:
        return 0xA0 + h % 16  # completes the two-byte character, so output is valid UTF-8
    r = h % 100
    if r < 3:
        return EOS_ID
    if r < 8:
        return 0xC3  # start of a two-byte character ("à".."ï")
    return 32 + h % 95


def reference_greedy(prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        tok = next_token(ids)
        out.append(tok)
        ids.append(tok)
        if tok == EOS_ID and not ignore_eos:
            break
    return out


class FakeModelRunner:
    def __init__(self, server_args=None, source=None, pool_size: int | None = None,
                 context_len: int = 512, rows: int = 64):
        size = pool_size or (getattr(server_args, "max_total_tokens", None) or 4096)
        self.model_config = SimpleNamespace(vocab_size=VOCAB, context_len=context_len, num_layers=1,
                                            eos_token_ids=[EOS_ID], is_generation=True, hf_config=None)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.max_total_num_tokens = size
        self.req_to_token_pool = FakeReqToTokenPool(rows, context_len)
        self.token_to_kv_pool = SimpleNamespace(kv=torch.full((size + 1,), -1, dtype=torch.int64))
        self.token_to_kv_pool_allocator = FakeAllocator(size)
        self.forward_calls: list[ForwardBatch] = []
        self.step_delay = float(os.environ.get("NL_FAKE_STEP_DELAY", "0"))

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        if self.step_delay:
            import time
            time.sleep(self.step_delay)
        self.forward_calls.append(batch)
        kv = self.token_to_kv_pool.kv
        kv[batch.out_cache_loc] = batch.input_ids
        r2t = self.req_to_token_pool.req_to_token
        # One row per new token with return_all_logits (prompt logprobs), else per request.
        ends = []
        for i in range(batch.batch_size):
            n, ext = batch.seq_lens_cpu[i], batch.extend_lens_cpu[i]
            first = n - ext + 1 if batch.return_all_logits else n
            ends += [(i, e) for e in range(first, n + 1)]
        logits = torch.zeros((len(ends), VOCAB))
        for j, (i, n) in enumerate(ends):
            context = kv[r2t[int(batch.req_pool_indices[i]), :n]].tolist()
            assert -1 not in context, "read a KV slot that was never written"
            logits[j, next_token(context)] = 1.0
        if not batch.return_all_logits:
            return LogitsOutput(next_token_logits=logits)
        last = torch.tensor(list(itertools.accumulate(batch.extend_lens_cpu))) - 1
        return LogitsOutput(next_token_logits=logits[last], all_logits=logits)


def greedy(max_new_tokens, **kw):
    """Greedy SamplingParams as the API process would send them."""
    from nlcli.engine.sampling.params import SamplingParams

    return SamplingParams.from_dict(dict(max_new_tokens=max_new_tokens, temperature=0.0, **kw))


def write_byte_tokenizer(path: str) -> str:
    """A byte-level HF tokenizer (ids 0..255 = bytes, 256 = EOS) plus a config, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.add_special_tokens({"eos_token": "</s>", "additional_special_tokens": ["<a>", "<b>", "<c>"]})
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "eos_token_id": EOS_ID, "vocab_size": VOCAB,
                   "max_position_embeddings": 512}, f)
    return path


def _byte_of(ch: str) -> int:
    """The GPT-2 byte-to-unicode table maps bytes to these characters in this order."""
    code = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def test_fake_runner_matches_its_reference():
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.scheduler import Scheduler
    from nlcli.engine.io_struct import TokenizedGenerateReqInput

    runner = FakeModelRunner(pool_size=256)
    outs: list = []
    sched = Scheduler(ServerArgs(), runner, outs.append)
    prompt = list(b"hello paging")
    sched.handle(TokenizedGenerateReqInput("a", prompt, greedy(20, ignore_eos=True)))
    while sched.step():
        pass
    got = [t for o in outs for ids in o.new_token_ids for t in ids]
    assert got == reference_greedy(prompt, 20, ignore_eos=True)


# ---- a live `nl serve` on the fake runner ----------------------------------------------------
class LiveServer:
    """`nl serve` in a subprocess on the fake runner (or a real model); always killed on stop()."""

    api_key: str | None = None  # set by subclasses whose server runs with --api-key

    def __init__(self, tmpdir: str, args: list[str] = (), env: dict | None = None,
                 model_path: str | None = None, startup_timeout: float = 240.0):
        import socket
        import subprocess
        import sys

        if model_path is None:
            model_path = write_byte_tokenizer(os.path.join(tmpdir, "model"))
            from safetensors.torch import save_file

            save_file({"unused": torch.zeros(1)}, os.path.join(model_path, "model.safetensors"))
            env = {"NL_TEST_RUNNER": "tests.test_scheduler_fakes:FakeModelRunner", **(env or {})}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_path = model_path
        self.log_path = os.path.join(tmpdir, f"serve-{self.port}.log")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        full_env = {**os.environ, "PYTHONPATH": root, "NL_TEST_STRICT_LEAK": "1",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "nl"), "serve", "--model-path", model_path,
             "--port", str(self.port), *args],
            cwd=root, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        # /health_generate is protected when the server has an API key.
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nl serve exited with {self.proc.returncode}:\n{self.log()}")
            if "fired up and ready to roll" in self.log():
                try:
                    r = httpx.get(self.url + "/health_generate", headers=headers, timeout=30)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"nl serve did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def engine_pids(self) -> list[int]:
        import subprocess

        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def engine_pid(self) -> int:
        """The engine child (multiprocessing's resource tracker is a child too)."""
        for pid in self.engine_pids():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    return pid
        raise RuntimeError("no engine process found")

    def stop(self, sig=None, timeout: float = 60.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.engine_pids():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
