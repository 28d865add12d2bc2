"""Compile csrc/*.c into one shared library, cached per source and CPU, and load it with ctypes.

The library is built for the machine it runs on (`-march=native`), under `$NL_CACHE_DIR`,
`$XDG_CACHE_HOME/nl` or `~/.cache/nl` (the temp directory where none can be written), so the
cache key holds the CPU flags as well as the sources and the compiler: a home directory shared by
two kinds of CPU keeps a build for each. Builds are written under a temporary name and renamed into place, so processes
starting together (tensor-parallel ranks) never load a half-written file. OpenMP comes from the
libgomp torch has already loaded (same soname), so these kernels share torch's thread pool rather
than start a second one that would spin against it on the same cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch  # noqa: F401  (loads torch's libgomp before ours binds to it)

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def cache_dir() -> Path:
    root = os.environ.get("NL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nl")
    return Path(root) / "cpu_kernels"


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _key(cc: str) -> str:
    h = hashlib.sha256()
    for src in sorted(CSRC.glob("*.[ch]")):
        h.update(src.name.encode() + src.read_bytes())
    h.update(" ".join([cc] + FLAGS).encode() + _cpu_flags().encode())
    return h.hexdigest()[:16]


def _dirs() -> tuple[Path, Path]:
    """The cache directory, then one under the system's temp directory for where the home
    directory cannot be written (a read-only home in a container)."""
    return cache_dir(), Path(tempfile.gettempdir()) / f"nl-cpu-kernels-{os.getuid()}"


def _writable_dir() -> Path:
    for d in _dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    raise RuntimeError(f"no writable directory for the kernel build ({cache_dir()})")


def build() -> Path:
    """The library's path, compiling it first if this machine has no build of these sources."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    name = f"libnl_cpu_{_key(cc)}.so"
    for d in _dirs():
        if (d / name).exists():
            return d / name
    out = _writable_dir() / name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, out)
    logger.debug("built %s", out)
    return out


def load() -> ctypes.CDLL:
    return ctypes.CDLL(str(build()))
