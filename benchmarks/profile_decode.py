"""Where a decode step's time goes: engine-level (Scheduler + ModelRunner, no server) on the
embedded SmolLM2, at batch 1 and 32 with a context of a few hundred tokens per request.

Each part is timed by wrapping the engine's own modules and functions with exclusive timers (a
nested part's time is not counted in its parent), so the parts add up to the step:
matmuls (qkv/o/gate_up/down), lm_head, attention (SDPA and its K/V reads), kv_store
(set_kv_buffer), norms, rotary, activation, model_other (embedding, reshapes, the attention plan),
sampling (the sampler), scheduler (everything in Scheduler.step outside the forward and sampler).
Where the C decode step (model_executor/cpu_decode_runner.py) serves a batch, all of the decoder
body is one call, `c_decode_step`, and only the lm_head and sampling are timed apart from it.
CPU ops run synchronously, so wall-clock timers are exact here. The memory floor printed beside
the figures is the bytes of the weights a step reads (the quantized copies at up to the plan's row
count or the C step's batch limit, the dense weights above) / measured read bandwidth (a sum over a buffer larger than the
caches).
Prints a table (stderr) and one JSON line (stdout):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/profile_decode.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

import torch

PARTS = ("c_decode_step", "matmuls", "lm_head", "attention", "kv_store", "norms", "rotary",
         "activation", "model_other", "sampling", "scheduler")


class PartTimer:
    """Exclusive wall time per part: entering a part pauses the one it is nested in."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [part, started]

    def wrap(self, part: str, fn):
        def timed(*a, **kw):
            now = time.perf_counter()
            if self.stack:
                top = self.stack[-1]
                self.totals[top[0]] += now - top[1]
            self.stack.append([part, now])
            try:
                return fn(*a, **kw)
            finally:
                end = time.perf_counter()
                p, started = self.stack.pop()
                self.totals[p] += end - started
                if self.stack:
                    self.stack[-1][1] = end
        return timed


def instrument(sched, timer: PartTimer) -> None:
    """Wrap the engine's modules (instance attributes only: nothing global is patched)."""
    import nlcli.engine.scheduler.output as output
    from nlcli.engine.layers.activation import SiluAndMul
    from nlcli.engine.layers.attention import Attention
    from nlcli.engine.layers.logits import LogitsProcessor
    from nlcli.engine.layers.norm import RMSNorm
    from nlcli.engine.layers.rotary import RotaryEmbedding

    runner = sched.runner
    compiled = getattr(runner, "compile_runner", None) is not None
    # Under --enable-torch-compile the timers would break the compiled graphs: whole step only.
    for name, mod in ([] if compiled else runner.model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        part = None
        if leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            part = "matmuls"
        elif isinstance(mod, LogitsProcessor):
            part = "lm_head"
        elif isinstance(mod, Attention):
            part = "attention"
        elif isinstance(mod, RMSNorm):
            part = "norms"
        elif isinstance(mod, RotaryEmbedding):
            part = "rotary"
        elif isinstance(mod, SiluAndMul):
            part = "activation"
        if part is not None:
            for method in ("forward", "rotate", "cos_sin"):  # rotary: per-forward table, per-layer turn
                if hasattr(mod, method):
                    setattr(mod, method, timer.wrap(part, getattr(mod, method)))
    pool = runner.token_to_kv_pool
    pool.set_kv_buffer = timer.wrap("kv_store", pool.set_kv_buffer)
    c_step = getattr(runner, "cpu_decode_runner", None)
    if c_step is not None:
        c_step.forward = timer.wrap("c_decode_step", c_step.forward)
    runner.forward = timer.wrap("model_other", runner.forward)
    # The sampler: module-level name looked up at call time by OutputProcessor.append_tokens.
    output.sample_each = timer.wrap("sampling", output.sample_each)
    sched.step = timer.wrap("scheduler", sched.step)


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a streaming read (torch's sum over a float32 buffer far larger than the L3)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(reps))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build(threads: int, extra: dict):
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.model_executor.model_runner import ModelRunner
    from nlcli.engine.scheduler.scheduler import Scheduler

    args = ServerArgs(device="cpu", max_total_tokens=40000, max_running_requests=64,
                      num_threads=threads, decode_log_interval=10**9, **extra)
    runner = ModelRunner(args)
    return Scheduler(args, runner, send=lambda msg: None)


def run_batch(sched, bs: int, ctx: int, steps: int, seed: int):
    """Prefill `bs` requests of `ctx` random tokens, then time `steps` decode steps."""
    from nlcli.engine.io_struct import TokenizedGenerateReqInput
    from nlcli.engine.sampling.params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    sp = SamplingParams.from_dict(dict(max_new_tokens=steps + 4, temperature=0.0, ignore_eos=True))
    for i in range(bs):
        ids = torch.randint(100, 49000, (ctx,), generator=g).tolist()
        sched.handle(TokenizedGenerateReqInput(f"b{bs}-{seed}-{i}", ids, sp))
    while sched.waiting or sched.chunked_req or len(sched.running) < bs:
        sched.step()
    sched.step()  # first decode: lazy init
    timer = PartTimer()
    instrument(sched, timer)
    times = []
    for _ in range(steps):
        timer.totals.clear()
        t0 = time.perf_counter()
        sched.step()
        times.append((time.perf_counter() - t0, dict(timer.totals)))
    while sched.has_work:  # finish and free the requests
        sched.step()
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's)")
    p.add_argument("--ctx", type=int, default=300, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enable-torch-compile", action="store_true")
    p.add_argument("--torch-compile-max-bs", type=int, default=32)
    a = p.parse_args()
    extra = {"dtype": a.dtype}
    if a.enable_torch_compile:
        extra.update(enable_torch_compile=True, torch_compile_max_bs=a.torch_compile_max_bs)
    sched = build(a.threads, extra)
    runner = sched.runner
    compile_runner = getattr(runner, "compile_runner", None)
    if compile_runner is not None:  # wait for every bucket (the engine serves eagerly meanwhile)
        compile_runner.thread.join()
        print(f"torch.compile seconds per bucket: {compile_runner.compile_seconds}", file=sys.stderr)
    bw = read_bandwidth()
    # A step reads the quantized copies up to the plan's row count where every matrix has one,
    # else the dense weights.
    plan = runner.quant_plan
    dense_bytes = runner.weight_bytes - plan.extra_bytes
    all_quantized = plan.quantized and plan.quantized == plan.total

    # The C decode step reads the quantized copies up to its own measured batch limit.
    c_step = getattr(runner, "cpu_decode_runner", None)
    quantized_rows = max(plan.max_rows, c_step.max_rows if c_step is not None else 0)

    def floor_ms(bs: int) -> float:
        small = all_quantized and bs <= quantized_rows
        return (plan.extra_bytes if small else dense_bytes) / bw * 1000

    result = {"threads": torch.get_num_threads(), "dtype": str(runner.dtype),
              "weight_mb": dense_bytes / 1e6, "quantized_mb": plan.extra_bytes / 1e6,
              "quantized_up_to_rows": quantized_rows, "read_gbps": bw / 1e9,
              "compile_s": compile_runner.compile_seconds if compile_runner is not None else None}
    print(f"threads {result['threads']}, {runner.dtype}, weights {dense_bytes / 1e6:.0f} MB dense, "
          f"{plan.extra_bytes / 1e6:.0f} MB quantized (read at up to {quantized_rows} rows), "
          f"read bandwidth {bw / 1e9:.1f} GB/s",
          file=sys.stderr)
    for bs in [int(x) for x in a.batch_sizes.split(",")]:
        times = run_batch(sched, bs, a.ctx, a.steps, seed=bs)
        step_ms = statistics.median(t for t, _ in times) * 1000
        parts = {k: statistics.median(d.get(k, 0.0) for _, d in times) * 1000 for k in PARTS}
        result[f"bs{bs}"] = {"step_ms": step_ms, "floor_ms": round(floor_ms(bs), 2),
                             **{k: round(v, 2) for k, v in parts.items()}}
        print(f"batch {bs}: {step_ms:.1f} ms/step (memory floor {floor_ms(bs):.1f} ms), "
              f"{bs / step_ms * 1000:.0f} tok/s", file=sys.stderr)
        for k in PARTS:
            print(f"  {k:12s} {parts[k]:7.2f} ms", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
