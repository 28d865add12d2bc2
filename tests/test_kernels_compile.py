"""The Triton kernels (attention, RMSNorm, KV store, SiLU-and-mul) compile for NVIDIA targets with the exact launch configs the wrappers use.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (types of
loop-carried values, tl.dot shape limits, shared memory). Triton's wheel bundles ptxas, so this
test compiles each kernel down to a cubin for sm_90 / sm_80 without a GPU. It runs in a child
process because this pytest process may have put Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (label, num_heads, num_kv_heads, head_dim, dtype, arch)
CASES = [
    ("smollm2-bf16", 9, 3, 64, "bfloat16", 90),
    ("llama-bf16", 32, 8, 128, "bfloat16", 90),
    ("fp32-mha", 4, 4, 64, "float32", 90),
    ("llama-fp16", 32, 8, 128, "float16", 80),
]
# The smallest per-block opt-in shared memory among current NVIDIA parts (sm_86/sm_89).
SHARED_LIMIT = 99 * 1024


def _compile_all() -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nlcli.kernels import activation as act
    from nlcli.kernels import decode_attention as dec
    from nlcli.kernels import extend_attention as ext
    from nlcli.kernels import kv_store as kv
    from nlcli.kernels import rmsnorm as norm

    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    index_args = {"Req_to_token", "Req_pool_indices", "Seq_lens", "Prefix_lens", "Extend_lens",
                  "Qo_start_loc", "Loc"}

    def build(kernel, config, dtype, arch):
        constexprs = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("Q", "K_Buffer", "V_Buffer", "O", "X", "Residual", "W", "Out", "K", "V"):
                signature[name] = "*" + short[dtype]
            elif name in index_args:
                signature[name] = "*i64"
            elif name in ("Mid_O", "Mid_Lse"):
                signature[name] = "*fp32"
            elif name in ("sm_scale", "eps"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"  # strides
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    results = []
    for label, num_heads, num_kv_heads, head_dim, dtype, arch in CASES:
        torch_dtype = getattr(torch, dtype)
        group = num_heads // num_kv_heads
        stage1, stage2 = dec.decode_launch_config(
            head_dim, group, torch_dtype, True, dec.DEFAULT_NUM_KV_SPLITS
        )
        extend = ext.extend_launch_config(head_dim, group, torch_dtype, True)
        rmsnorm = {**norm.rmsnorm_launch_config(num_heads * head_dim), "HAS_RESIDUAL": True}
        store = kv.store_kv_launch_config(num_kv_heads, head_dim)
        silu = act.silu_and_mul_launch_config(4 * num_heads * head_dim)
        for kernel, config in ((dec._decode_stage1_kernel, stage1),
                               (dec._decode_stage2_kernel, stage2),
                               (ext._extend_kernel, extend),
                               (norm._rmsnorm_kernel, rmsnorm),
                               (kv._store_kv_kernel, store),
                               (act._silu_and_mul_kernel, silu)):
            compiled = build(kernel, config, dtype, arch)
            results.append({
                "case": label, "kernel": kernel.__name__, "arch": arch,
                "shared": compiled.metadata.shared, "cubin": len(compiled.asm["cubin"]),
            })
    return results


@pytest.mark.slow
def test_kernels_compile_for_nvidia_targets():
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        cwd=root, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6 * len(CASES)
    for r in results:
        assert r["cubin"] > 0, r
        assert r["shared"] <= SHARED_LIMIT, r


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print(json.dumps(_compile_all()))
