"""Tensor parallelism at the runner level: two ranks (spawned processes, gloo on the CPU, float32)
must give what one rank gives: the same greedy tokens, logprobs within 1e-4, embeddings within
1e-5, on a Llama with 4 KV heads, one with 1 KV head (replicated), Qwen2 (qkv bias, tied
embeddings), the embedded SmolLM2 (9 heads over 3 KV heads: an uneven split), a decoder and a
BERT-style embedding model. Also: weight updates on every rank, all or nothing, and a flag
mismatch between ranks refused by name. One group of two ranks runs every case in turn.
"""

from __future__ import annotations

import pytest
import torch

from nlcli.engine.distributed.node import free_port
from tests.tiny_models import EngineDriver, build_tiny_model, make_runner, perturbed_copy

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 12, 13], [42]]
NEW_TOKENS = 6


def _generate(runner) -> dict:
    driver = EngineDriver(runner)
    rids = [driver.new_request() for _ in PROMPTS]
    out = driver.forward(rids, PROMPTS, return_all_logits=True)
    logprobs = torch.log_softmax(out.all_logits.float(), dim=-1)
    driver.free_all()
    return {"greedy": driver.generate_greedy(PROMPTS, NEW_TOKENS), "logprobs": logprobs}


def _embed(runner) -> dict:
    driver = EngineDriver(runner)
    rids = [driver.new_request() for _ in PROMPTS]
    out = driver.forward(rids, PROMPTS)
    driver.free_all()
    return {"embeddings": out.embeddings.float()}


def _update(runner, new_path: str) -> dict:
    before = _generate(runner)["greedy"]
    result = runner.update_weights(new_path, None, runner.server_args)
    return {"before": before, "success": result.success, "message": result.message,
            "after": _generate(runner)["greedy"]}


def run_case(runner, case: dict) -> dict:
    if case["kind"] == "embed":
        return _embed(runner)
    if case["kind"] == "update":
        return _update(runner, case["new_path"])
    return _generate(runner)


def _failing_update(*args, **kwargs):
    from nlcli.engine.model_loader.weight_update import WeightUpdateResult

    return WeightUpdateResult(False, "Failed to update weights: injected failure on this rank.")


def _rank_main(rank: int, addr: str, cases: list, results) -> None:
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.distributed import weight_sync
    from nlcli.engine.distributed.parallel_state import (check_same_args, destroy_tp_group,
                                                         init_tp_group)
    from nlcli.engine.distributed.step_sync import run_worker

    init_tp_group(addr, rank, 2, "cpu", 120)
    try:
        check_same_args(ServerArgs(context_length=64 * (rank + 1)))
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    if rank == 0:
        results.put(("mismatch", mismatch))
    real_update = weight_sync.update_weights_from_disk
    for case in cases:
        # Only rank 1 fails this update: rank 0 must roll back too.
        if rank == 1 and case.get("fail_on_rank_1"):
            weight_sync.update_weights_from_disk = _failing_update
        runner = make_runner(case["path"], tp_size=2, **case["args"])
        if rank == 0:
            # numpy travels by value; a tensor would go as shared memory this process may have
            # released by the time the test reads it.
            got = {k: v.numpy() if isinstance(v, torch.Tensor) else v
                   for k, v in run_case(runner, case).items()}
            results.put((case["name"], got))
            runner.shutdown()
        else:
            run_worker(runner)
        weight_sync.update_weights_from_disk = real_update
    destroy_tp_group()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    llama4 = build_tiny_model("llama", str(root / "llama-kv4"), num_key_value_heads=4)
    llama1 = build_tiny_model("llama", str(root / "llama-kv1"), num_key_value_heads=1)
    qwen2 = build_tiny_model("qwen2", str(root / "qwen2"))
    moved = perturbed_copy(llama4, str(root / "llama-kv4-moved"))
    small = {"max_total_tokens": 1024, "max_running_requests": 8}
    return [
        {"name": "llama-kv4", "kind": "generate", "path": llama4, "args": {}},
        {"name": "llama-kv1", "kind": "generate", "path": llama1, "args": {}},
        {"name": "qwen2", "kind": "generate", "path": qwen2, "args": {}},
        {"name": "smollm2", "kind": "generate", "path": None, "args": small},
        {"name": "decoder-embed", "kind": "embed", "path": qwen2, "args": {"is_embedding": True}},
        {"name": "minilm", "kind": "embed", "path": None, "args": {"is_embedding": True, **small}},
        {"name": "update", "kind": "update", "path": llama4, "args": {}, "new_path": moved},
        {"name": "update-fails-on-rank-1", "kind": "update", "path": llama4, "args": {},
         "new_path": moved, "fail_on_rank_1": True},
    ]


@pytest.fixture(scope="module")
def tp2(cases):
    """name -> what rank 0 of a two-rank group returned for that case."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(rank, addr, cases, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=600) for _ in range(len(cases) + 1))
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return got


def _tp1(case: dict) -> dict:
    return run_case(make_runner(case["path"], **case["args"]), case)


@pytest.mark.parametrize("name", ["llama-kv4", "llama-kv1", "qwen2", "smollm2"])
def test_tp2_generates_like_tp1(cases, tp2, name):
    case = next(c for c in cases if c["name"] == name)
    want, got = _tp1(case), tp2[name]
    assert got["greedy"] == want["greedy"]
    assert torch.allclose(torch.from_numpy(got["logprobs"]), want["logprobs"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["decoder-embed", "minilm"])
def test_tp2_embeds_like_tp1(cases, tp2, name):
    case = next(c for c in cases if c["name"] == name)
    got = torch.from_numpy(tp2[name]["embeddings"])
    assert torch.allclose(got, _tp1(case)["embeddings"], atol=1e-5, rtol=0)


def test_weight_update_loads_every_rank(cases, tp2):
    want, got = _tp1(next(c for c in cases if c["name"] == "update")), tp2["update"]
    assert want["success"] and got["success"], got["message"]
    assert got["after"] != got["before"]  # the new weights changed the output ...
    assert got["after"] == want["after"]  # ... exactly as on one rank


def test_a_rank_failing_an_update_rolls_back_every_rank(tp2):
    got = tp2["update-fails-on-rank-1"]
    assert not got["success"]
    assert got["message"].startswith("TP rank 1: Failed to update weights: injected failure")
    assert got["after"] == got["before"]  # rank 0 succeeded alone, then restored its shard


def test_ranks_with_different_flags_refuse_naming_the_flag(tp2):
    assert tp2["mismatch"] == ("--context-length differs between ranks: rank 0 has 64, rank 1 "
                               "has 128; start every node with the same flags")
