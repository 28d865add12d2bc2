"""RMSNorm kernel (plain and fused with the residual add): Triton vs torch reference vs transformers.

Same interpreter arrangement as the attention tests (tests/kernel_harness.py): TRITON_INTERPRET=1
without CUDA, a fresh process when this one already imported Triton compiled-only.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_harness import (  # noqa: F401 (interpret_while_running: autouse fixture)
    COMPILED_ONLY,
    DEVICE,
    assert_passes_in_fresh_interpreter,
    interpret_while_running,
    load_kernels,
    needs_gpu,
)

_mods = load_kernels(["nlcli.kernels.rmsnorm"])
IN_PROCESS = _mods is not None
if IN_PROCESS:
    rmsnorm_fwd, rmsnorm_ref = _mods[0].rmsnorm_fwd, _mods[0].rmsnorm_ref

in_process = pytest.mark.skipif(not IN_PROCESS, reason=COMPILED_ONLY)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_norm_kernel_in_fresh_interpreter_process():
    assert_passes_in_fresh_interpreter(__file__)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, res = torch.randn(2, 5, 96, dtype=dtype), torch.randn(2, 5, 96, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(rmsnorm_ref(x, norm.weight, 1e-5), norm(x))
        out, new_res = rmsnorm_ref(x, norm.weight, 1e-5, res.clone())
        assert torch.equal(new_res, x + res)
        assert torch.equal(out, norm(x + res))


@in_process
@pytest.mark.parametrize("hidden,rows", [(64, 3), (576, 5)])  # 576: SmolLM2, not a power of two
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_kernel_matches_reference(hidden, rows, with_residual):
    gen = torch.Generator().manual_seed(hidden + rows)
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE)
    weight = torch.randn(hidden, generator=gen).to(DEVICE)
    residual = torch.randn(rows, hidden, generator=gen).to(DEVICE) if with_residual else None
    if residual is None:
        out, ref = rmsnorm_fwd(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6)
    else:
        out, res_out = rmsnorm_fwd(x, weight, 1e-6, residual.clone())
        ref, res_ref = rmsnorm_ref(x, weight, 1e-6, residual.clone())
        torch.testing.assert_close(res_out, res_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_norm_kernel_bf16_matches_reference_on_gpu():
    x = torch.randn(37, 4096, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)
    out, res_out = rmsnorm_fwd(x, weight, 1e-5, residual.clone())
    ref, res_ref = rmsnorm_ref(x, weight, 1e-5, residual.clone())
    torch.testing.assert_close(res_out, res_ref, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
