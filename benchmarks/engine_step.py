"""Per-step engine timing without the server: ModelRunner.forward on the embedded SmolLM2.

Runs a decode at batch size 1 and 32 and one prefill through the real pools, and prints the median
milliseconds per forward as one JSON line (stdout). `--profile` prints cProfile's top functions
(stderr) for the decode at the chosen batch size. Run the same script against two source trees
(PYTHONPATH=<tree>) alternately for an A/B comparison on a busy machine:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/engine_step.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build_runner(threads: int, pool: int, quantization=None):
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.model_executor.model_runner import ModelRunner

    args = ServerArgs(dtype="float32", device="cpu", max_total_tokens=pool, max_running_requests=64,
                      num_threads=threads, quantization=quantization)
    return ModelRunner(args)


class Requests:
    """Rows and slots for `bs` requests, prefilled once to `ctx` tokens each."""

    def __init__(self, runner, bs: int, ctx: int, seed: int = 0):
        from nlcli.engine.forward_batch import ForwardBatch

        self.runner, self.FB = runner, ForwardBatch
        g = torch.Generator().manual_seed(seed)
        self.rows = runner.req_to_token_pool.alloc(bs)
        self.lens = [0] * bs
        prompts = [torch.randint(0, 49152, (ctx,), generator=g).tolist() for _ in range(bs)]
        self.last = None
        self.prefill_s = self.step(prompts)

    def step(self, new_ids) -> float:
        r = self.runner
        slots = r.token_to_kv_pool_allocator.alloc(sum(len(x) for x in new_ids))
        start = 0
        for i, ids in enumerate(new_ids):
            r.req_to_token_pool.req_to_token[self.rows[i], self.lens[i]: self.lens[i] + len(ids)] = \
                slots[start: start + len(ids)]
            start += len(ids)
        batch = self.FB.create(new_ids, list(self.lens), self.rows, slots, r.device)
        t0 = time.perf_counter()
        out = r.forward(batch)
        dt = time.perf_counter() - t0
        self.lens = [n + len(ids) for n, ids in zip(self.lens, new_ids)]
        self.last = out.next_token_logits.argmax(-1).tolist()
        return dt

    def decode(self) -> float:
        return self.step([[t] for t in self.last])

    def free(self) -> None:
        r = self.runner
        for row, n in zip(self.rows, self.lens):
            r.token_to_kv_pool_allocator.free(r.req_to_token_pool.req_to_token[row, :n].clone())
        r.req_to_token_pool.free(self.rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--profile", type=int, default=0, help="profile decode at this batch size")
    p.add_argument("--quantization", default=None, help="as nl serve's (none, gguf, int8, int4)")
    a = p.parse_args()
    runner = build_runner(a.threads, 40000, a.quantization)
    result = {"threads": torch.get_num_threads(), "quantization": runner.quant_plan.describe()}
    for bs in [int(x) for x in a.batch_sizes.split(",")]:
        reqs = Requests(runner, bs, a.ctx)
        result[f"prefill_bs{bs}_ms"] = reqs.prefill_s * 1000
        for _ in range(2):
            reqs.decode()
        times = [reqs.decode() for _ in range(a.steps)]
        result[f"decode_bs{bs}_ms"] = statistics.median(times) * 1000
        if a.profile == bs:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.steps):
                reqs.decode()
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)
        reqs.free()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
