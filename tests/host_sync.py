"""A guard that fails on any device-to-host read: `.item()`, `.tolist()`, `bool(t)`, `int(t)`, ...

On a GPU each of those waits for the device (and cannot run inside CUDA-graph capture). On the CPU
they are free, so a CPU test would never notice one; under `no_host_sync()` they raise instead.
Code that may read the host on purpose (a kernel's torch reference stands in for a kernel that
would not) is wrapped with `allow_host_sync`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import torch

_GUARDED = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
_state = threading.local()


class HostSyncError(AssertionError):
    pass


def _guarded(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if getattr(_state, "active", 0) and not getattr(_state, "allowed", 0):
            raise HostSyncError(f"Tensor.{name} read the device from the host inside a forward")
        return original(self, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in _GUARDED}
    for name, fn in originals.items():
        setattr(torch.Tensor, name, _guarded(name, fn))
    _state.active = getattr(_state, "active", 0) + 1
    try:
        yield
    finally:
        _state.active -= 1
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def allow_host_sync(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _state.allowed = getattr(_state, "allowed", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state.allowed -= 1

    return wrapper
