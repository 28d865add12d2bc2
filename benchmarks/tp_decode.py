"""Tensor parallelism on the CPU: decode ms/step on the embedded SmolLM2, TP=2 with 1 thread per
rank against TP=1 with 2 threads (the same two cores either way).

Each configuration runs ModelRunner.forward through the real pools (benchmarks/engine_step.py's
`Requests`): TP=2 as two spawned ranks on gloo, rank 0 timing its forwards (which include the
broadcast to rank 1 and the all-reduces), TP=1 in one process. Prints one JSON line (stdout):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/tp_decode.py
    ... --batch-sizes 1 --steps 3 --ctx 16        (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch.multiprocessing as mp

from nlcli.engine.distributed.node import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _measure(runner, batch_sizes: list[int], ctx: int, steps: int) -> dict:
    from engine_step import Requests

    out = {}
    for bs in batch_sizes:
        reqs = Requests(runner, bs, ctx)
        for _ in range(2):
            reqs.decode()
        out[f"decode_bs{bs}_ms"] = statistics.median(reqs.decode() for _ in range(steps)) * 1000
        reqs.free()
    return out


def _runner(threads: int, tp_size: int):
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.model_executor.model_runner import ModelRunner

    return ModelRunner(ServerArgs(dtype="float32", device="cpu", max_total_tokens=40000,
                                  max_running_requests=64, num_threads=threads, tp_size=tp_size))


def _rank(rank: int, addr: str, a, results) -> None:
    from nlcli.engine.distributed.parallel_state import destroy_tp_group, init_tp_group
    from nlcli.engine.distributed.step_sync import run_worker

    init_tp_group(addr, rank, 2, "cpu", 600)
    runner = _runner(1, 2)
    if rank == 0:
        results.put(_measure(runner, a.batch_sizes, a.ctx, a.steps))
        runner.shutdown()
    else:
        run_worker(runner)
    destroy_tp_group()


def _tp1(a, results) -> None:
    results.put(_measure(_runner(2, 1), a.batch_sizes, a.ctx, a.steps))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,32")
    a = p.parse_args()
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # TP=1 in a child too, so neither configuration inherits the other's thread pools.
    one = ctx.Process(target=_tp1, args=(a, results))
    one.start()
    tp1 = results.get()
    one.join()
    addr = f"127.0.0.1:{free_port()}"
    ranks = [ctx.Process(target=_rank, args=(r, addr, a, results)) for r in (0, 1)]
    for proc in ranks:
        proc.start()
    tp2 = results.get()
    for proc in ranks:
        proc.join()
    print(json.dumps({"tp1_2threads": tp1, "tp2_1thread_per_rank": tp2}))


if __name__ == "__main__":
    main()
