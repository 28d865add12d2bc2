"""Per-shape matmul timings of every path nl can pick (layers/quantization/), next to the memory
floor of each: the bytes its weight format reads divided by the measured read bandwidth.

The shapes are the embedded SmolLM2-135M's (fused qkv, o, fused gate/up, down, lm_head). Each
path runs over enough copies of a weight to overflow the CPU caches (a decode step streams all
layers from memory; one matrix alone would sit in cache and flatter the dense paths), and reports
the median milliseconds per matrix at each row count. Prints one table (stdout). Heavy: run it on
a quiet machine.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/matmul_paths.py --rows 1 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nlcli.cpu_kernels import blocks
from nlcli.cpu_kernels import ops as cpu_ops
from nlcli.engine.layers.quantization import int4_pack, int8_pack, prepack

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}


def read_bandwidth(mb: int = 512) -> float:
    """Bytes per second of a streaming read (a sum over a tensor larger than any cache)."""
    x = torch.ones(mb * 2**18)
    x.sum()
    best = min(_seconds(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paths(w: torch.Tensor):
    """(name, bytes per weight, [callables over copies]) for each path; x is cast per path."""
    bf = w.bfloat16()
    out = [("dense f32", 4, lambda x, w=w: F.linear(x, w)),
           ("dense bf16", 2, lambda x, w=bf: F.linear(x.bfloat16(), w))]
    for name, dense in (("prepacked f32", w), ("prepacked bf16", bf)):
        method = prepack.prepack(dense)
        if method is not None:
            exact = "exact" if prepack.is_exact(method) else "not exact"
            out.append((f"{name} ({exact})", dense.element_size(),
                        lambda x, m=method, dt=dense.dtype: m(x.to(dt))))
    q8 = int8_pack.pack(*int8_pack.quantize(w), torch.bfloat16)
    out.append(("int8 (bf16 act)", 1 + 2 / w.shape[1],
                lambda x, q=q8: int8_pack.int8_mm(x.bfloat16(), q)))
    q4 = int4_pack.pack(*int4_pack.quantize(w), torch.bfloat16)
    out.append(("int4 g32 (bf16 act)", 0.5 + 4 / 32,
                lambda x, q=q4: int4_pack.int4_mm(x.bfloat16(), q)))
    if cpu_ops.available():  # nl's C kernels (cpu_kernels): float16 scales per block of 32
        b4 = blocks.q4_from_grid(*int4_pack.quantize(w))
        out.append(("nl Q4_1 (int16 act)", 0.5 + 4 / 32, lambda x, b=b4: cpu_ops.q4_mm(x, b)))
        b8 = blocks.q8_quantize(w)
        out.append(("nl Q8_0 (int16 act)", 1 + 2 / 32, lambda x, b=b8: cpu_ops.q8_mm(x, b)))
    return out


def time_shape(name: str, n: int, k: int, rows: list[int], bw: float, budget_mb: int) -> None:
    copies = max(1, budget_mb * 2**20 // (n * k * 4))
    weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    per_copy = [paths(w) for w in weights]
    for p, (label, bpw, _) in enumerate(per_copy[0]):
        floor = n * k * bpw / bw * 1e3
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            fns = [c[p][2] for c in per_copy]
            fns[0](x)  # warm-up (oneDNN primitive creation)
            times = [_seconds(lambda: [fn(x) for fn in fns]) / len(fns) for _ in range(3)]
            cells.append(f"M={m}: {statistics.median(times) * 1e3:8.3f} ms")
        print(f"{name:8} {f'{n}x{k}':11} {label:28} floor {floor:7.3f} ms  " + "  ".join(cells),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budget-mb", type=int, default=256,
                    help="weight copies per shape (MB of f32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, read bandwidth {bw / 1e9:.1f} GB/s")
    with torch.inference_mode():
        for name in args.shapes:
            time_shape(name, *SHAPES[name], args.rows, bw, args.budget_mb)


if __name__ == "__main__":
    main()
