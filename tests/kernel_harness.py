"""Test helpers for the Triton kernel tests: where kernels run and how they are loaded.

With CUDA the kernels run natively. Without it they run under TRITON_INTERPRET=1, which must be set
before `triton.language` is imported (its own helpers are decorated at import); when this process
already imported it compiled-only, `load_kernels` returns None and the module's tests re-run in a
fresh interpreter process instead (`assert_passes_in_fresh_interpreter`).

A kernel test module imports `interpret_while_running` so the autouse fixture applies to it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import pytest
import torch

from nlcli.kernels.interpret import interpret_env, load_kernel_modules, run_in_fresh_interpreter

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
COMPILED_ONLY = "triton.language was imported compiled-only; run in a fresh process"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def load_kernels(names: Sequence[str]) -> Optional[list[ModuleType]]:
    """The kernel modules, interpreted without CUDA; None if this process cannot interpret them.

    Skips the calling test module when Triton is not installed.
    """
    with interpret_env(not HAS_CUDA):
        pytest.importorskip("triton")
        return load_kernel_modules(names, interpret=not HAS_CUDA)


@pytest.fixture(autouse=True, scope="module")
def interpret_while_running():
    # The interpreter consults the flag at call time too; keep it scoped to the test module.
    with interpret_env(not HAS_CUDA):
        yield


def assert_passes_in_fresh_interpreter(test_file: str | Path) -> None:
    proc = run_in_fresh_interpreter(Path(test_file))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
