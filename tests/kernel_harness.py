"""Test helpers for the Triton kernel tests: where kernels run and how they are loaded.

With CUDA the kernels run natively. Without it they run under TRITON_INTERPRET=1, which must be set
before `triton.language` is imported: the flag is read when a function is decorated with
@triton.jit, and that includes triton.language's own helpers (tl.max, tl.cdiv), decorated when
triton.language is first imported. So a process that imported triton compiled-only (torch._dynamo
does so) cannot interpret kernels any more: `load_kernels` then returns None and the module's tests
re-run in a fresh interpreter process instead (`assert_passes_in_fresh_interpreter`).

A kernel test module imports `interpret_while_running` so the autouse fixture applies to it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
COMPILED_ONLY = "triton.language was imported compiled-only; run in a fresh process"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

_FLAG = "TRITON_INTERPRET"


@contextlib.contextmanager
def interpret_env(enabled: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET=1 for the duration (when enabled), then restore what was there."""
    saved = os.environ.get(_FLAG)
    if enabled:
        os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = saved


def _is_interpreted(module: ModuleType) -> Optional[bool]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for value in vars(module).values():
        if isinstance(value, InterpretedFunction):
            return True
        if isinstance(value, JITFunction):
            return False
    return None


def load_kernel_modules(names: Sequence[str], interpret: bool) -> Optional[list[ModuleType]]:
    """Import kernel modules decorated for the wanted mode; None if the interpreter is unusable.

    Call inside `interpret_env(interpret)`. Modules imported earlier in the other mode are
    reloaded (whoever holds the old functions keeps them).
    """
    import triton.language as tl

    if interpret and _is_interpreted(tl.standard) is False:
        return None
    modules = []
    for name in names:
        module = importlib.import_module(name)
        if _is_interpreted(module) not in (None, interpret):
            module = importlib.reload(module)
        modules.append(module)
    return modules


def run_in_fresh_interpreter(test_file: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one pytest file in a new process with TRITON_INTERPRET=1 set from the start."""
    test_file = Path(test_file).resolve()
    env = {**os.environ, _FLAG: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)]
    return subprocess.run(
        cmd, cwd=test_file.parents[1], env=env, capture_output=True, text=True, timeout=timeout
    )


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
