"""--enable-torch-compile on the CPU: decode batches run through torch.compile once their bucket
is compiled (in a background thread, off the request path), padded up to the bucket; greedy
tokens equal the eager engine's, which tests/test_engine_tiny.py holds to transformers."""

from __future__ import annotations

import pytest
import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.model_executor.compile_runner import create_compile_runner
from tests.tiny_models import EngineDriver, make_runner

PROMPTS = [[1, 504, 3575, 282, 4649, 314], [9690, 198], list(range(300, 347))]


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    path = tiny_model_dir("llama")
    compiled = make_runner(path, enable_torch_compile=True, torch_compile_max_bs=4)
    compiled.compile_runner.thread.join()
    yield make_runner(path), compiled


def test_buckets_compile_in_the_background(runners):
    _, compiled = runners
    cr = compiled.compile_runner
    assert cr.sizes == [1, 2, 4] and cr.ready == {1, 2, 4}
    assert set(cr.compile_seconds) == {1, 2, 4}


def test_compiled_greedy_tokens_equal_eager(runners, monkeypatch):
    eager, compiled = runners
    calls = []
    real = compiled.compile_runner.forward
    monkeypatch.setattr(compiled.compile_runner, "forward",
                        lambda b: calls.append(b.batch_size) or real(b))
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    # Three requests pad to the bucket of four; one alone runs in the bucket of one.
    want = EngineDriver(eager).generate_greedy(PROMPTS, 12)
    got = EngineDriver(compiled).generate_greedy(PROMPTS, 12)
    assert got == want
    assert calls and set(calls) == {3}
    one = PROMPTS[:1]
    assert EngineDriver(compiled).generate_greedy(one, 6) == EngineDriver(eager).generate_greedy(one, 6)
    assert 1 in calls
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on the request path


def test_compile_is_off_by_default_and_cpu_only(runners):
    eager, _ = runners
    assert eager.compile_runner is None
    args = ServerArgs(enable_torch_compile=True)
    assert create_compile_runner(args, eager.model, eager.attn_backend, torch.device("meta"), 8) is None
