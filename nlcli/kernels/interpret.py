"""Loading the Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), for tests.

The interpreter flag is read when a function is decorated with @triton.jit, and that includes
triton.language's own helpers (tl.max, tl.cdiv), which are decorated when triton.language is first
imported. So a process that imported triton compiled-only (torch._dynamo does so) cannot interpret
kernels any more; callers then fall back to a fresh process (`run_in_fresh_interpreter`).
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
