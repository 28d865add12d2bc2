"""Where and how the engine computes: the device, the dtype (with the reason, for the log) and
torch's CPU thread count. Decided once at start-up, before the weights load.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, hf_config=None) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the log)."""
    if name != "auto":
        return _DTYPES[name], f"--dtype {name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bfloat16 on CUDA"
        return torch.float16, "auto: float16 (this GPU lacks bfloat16)"
    return pick_cpu_dtype(hf_config)


def pick_cpu_dtype(hf_config=None) -> tuple[torch.dtype, str]:
    """bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX) and a matmul of the
    model's own shape is measurably faster; otherwise float32 (exact, and on AVX2-only CPUs
    bfloat16 matmuls are several times slower). bfloat16 keeps SmolLM2's greedy output unchanged
    on the test prompts, so speed decides."""
    native = _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
    if not native:
        return torch.float32, "auto: float32 (CPU has no native bfloat16: no AVX512-BF16/AMX)"
    hidden = getattr(hf_config, "hidden_size", 1024) or 1024
    inter = getattr(hf_config, "intermediate_size", 4 * hidden) or 4 * hidden
    t32, t16 = (_time_linear(dtype, hidden, inter) for dtype in (torch.float32, torch.bfloat16))
    if t16 < 0.8 * t32:
        return torch.bfloat16, f"auto: bfloat16 matmul {t32 / t16:.1f}x faster than float32 here"
    return torch.float32, f"auto: float32 (bfloat16 matmul not faster here: {t32 / t16:.2f}x)"


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn else False
    except Exception:
        return False


def _time_linear(dtype: torch.dtype, hidden: int, inter: int, rows: int = 16, reps: int = 5) -> float:
    """Best-of-reps seconds for a decode-sized matmul of the model's MLP shape."""
    x = torch.randn(rows, hidden).to(dtype)
    w = torch.randn(inter, hidden).to(dtype)
    torch.nn.functional.linear(x, w)  # warm up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return len(cores) or (os.cpu_count() or 1)


def cpu_threads(requested: Optional[int], ranks_on_node: int = 1) -> tuple[Optional[int], str]:
    """torch's CPU thread count: --num-threads, else OMP_NUM_THREADS (torch already honours it),
    else one per physical core (shared out among the `ranks_on_node` TP ranks of this machine). SMT siblings are left out: OpenMP workers spin while waiting, and
    a worker sharing a core makes every step wait for a descheduled spinner. Leaving a core for
    the API process was measured too (benchmarks/README.md): on 2 cores it cost 35% of prefill
    speed for no decode gain, so only a machine shared with other heavy work should go lower."""
    if requested:
        return requested, "--num-threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cores = physical_cores()
    if ranks_on_node > 1:
        return max(1, cores // ranks_on_node), f"{cores} physical cores / {ranks_on_node} TP ranks"
    return cores, "one per physical core"


def apply_cpu_threads(requested: Optional[int], ranks_on_node: int = 1) -> None:
    """Set torch's CPU thread count (see `cpu_threads`) and log the choice."""
    threads, why = cpu_threads(requested, ranks_on_node)
    if threads:
        torch.set_num_threads(threads)
        logger.info("torch CPU threads: %d (%s)", threads, why)


def choose_device_and_dtype(device: str, dtype: str,
                            hf_config=None) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype` resolved ("auto" included), with the choice logged."""
    dev = resolve_device(device)
    chosen, why = resolve_dtype(dtype, dev, hf_config)
    logger.info("Using dtype %s on %s (%s)", str(chosen).replace("torch.", ""), dev, why)
    return dev, chosen
