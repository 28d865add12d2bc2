"""Speed of the engine on a Llama-3.2-1B-shaped model (random weights), eager and with CUDA graphs.

Prints one table: batch-1 decode tokens/s and its fraction of the memory-bandwidth roofline
(weight bytes x tokens/s / peak bandwidth: a batch-1 step must stream every weight once), batch-64
decode tokens/s, and prefill tokens/s of one 4096-token prompt; each measured through
`ModelRunner.forward` with a greedy argmax per step (the sampler's host sync included), once with
`--disable-cuda-graph` and once without. Prefill never uses graphs; both columns are measured.

    python benchmarks/gpu_bench.py                           # on a GPU machine (gpu_check.sh)
    python benchmarks/gpu_bench.py --device cpu --shape tiny # the CPU smoke run the tests use

Peak bandwidth comes from a table by device name (benchmarks/gpu_models.py); set NL_PEAK_BW_GBPS
to override. `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import Requests, make_runner, peak_bandwidth, save_random_llama, sync  # noqa: E402


def measure(model_dir: str, a, graphs: bool) -> dict:
    runner = make_runner(model_dir, a.device, a.dtype, graphs, a.max_total_tokens, max(a.batch_sizes))
    gen = torch.Generator().manual_seed(0)
    vocab = runner.model_config.vocab_size
    result = {"weight_bytes": runner.weight_bytes,
              "graphs": runner.cuda_graph_runner is not None}
    for bs in a.batch_sizes:
        prompts = torch.randint(3, vocab, (bs, a.decode_context), generator=gen).tolist()
        reqs = Requests(runner, prompts)
        for _ in range(3):  # warm-up: lazy init, kernel compiles
            reqs.decode()
        result[f"decode_bs{bs}_tok_s"] = bs / reqs.timed_decode(a.steps)
        reqs.free()
    times = []
    for _ in range(a.prefill_reps + 1):
        prompt = torch.randint(3, vocab, (a.prefill_tokens,), generator=gen).tolist()
        sync(runner.device)
        start = time.perf_counter()
        reqs = Requests(runner, [prompt])
        sync(runner.device)
        times.append(time.perf_counter() - start)
        reqs.free()
    result["prefill_tok_s"] = a.prefill_tokens / statistics.median(times[1:])  # first: warm-up
    del runner, reqs
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return result


def table(device_name: str, peak: float | None, eager: dict, graphed: dict | None, a) -> str:
    weights = eager["weight_bytes"]
    lines = [f"device: {device_name}   dtype: {a.dtype}   model: {a.shape} (random weights, "
             f"{weights / 1e9:.2f} GB)   peak bandwidth: "
             + (f"{peak / 1e9:.0f} GB/s" if peak else "unknown (set NL_PEAK_BW_GBPS)"),
             "| metric | eager | CUDA graphs | graphs / eager |", "|---|---|---|---|"]

    def row(name, key, fmt="{:.1f}"):
        e, g = eager[key], graphed[key] if graphed else None
        cells = [fmt.format(e), fmt.format(g) if g is not None else "n/a",
                 f"{g / e:.2f}x" if g is not None else "n/a"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for bs in a.batch_sizes:
        row(f"decode bs={bs} tok/s (context {a.decode_context})", f"decode_bs{bs}_tok_s")
        if bs == 1 and peak:
            for r in (eager, graphed):
                if r:
                    r["decode_bs1_roofline"] = weights * r["decode_bs1_tok_s"] / peak
            row("decode bs=1 fraction of roofline", "decode_bs1_roofline", "{:.0%}")
    row(f"prefill tok/s ({a.prefill_tokens} tokens)", "prefill_tok_s", "{:.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--shape", default="llama-3.2-1b", choices=("llama-3.2-1b", "tiny"))
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--decode-context", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--model-dir", help="reuse a saved model instead of building one")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.max_total_tokens = (sum(a.batch_sizes) * (a.decode_context + a.steps + 8)
                          + a.prefill_tokens + 64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model_dir or save_random_llama(tmp, a.shape, getattr(torch, a.dtype), a.device)
        eager = measure(model_dir, a, graphs=False)
        graphed = measure(model_dir, a, graphs=True) if a.device == "cuda" else None
    if graphed is not None and not graphed["graphs"]:
        print("CUDA graphs were not captured (Triton backend unavailable?)", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(table(name, peak_bandwidth(name), eager, graphed, a))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "eager": eager, "cuda_graphs": graphed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
