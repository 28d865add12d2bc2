"""The layout's promises: the API process never loads the model side, and modules stay small."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "nlcli" / "engine" / "api"
# What only the engine process may import.
MODEL_SIDE = ("nlcli.engine.scheduler", "nlcli.engine.model_executor", "nlcli.engine.models",
              "nlcli.engine.layers", "nlcli.engine.mem_cache", "nlcli.engine.model_loader",
              "nlcli.kernels")


def _imports(path: pathlib.Path) -> list[str]:
    """Every module an import statement in `path` names, including imports inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_api_modules_never_name_the_model_side():
    offenders = {}
    for path in API.rglob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(MODEL_SIDE) or n.split(".")[0] == "torch"]
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_importing_the_api_loads_neither_the_model_side_nor_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import nlcli.engine.api as api\n"
        "for m in pkgutil.walk_packages(api.__path__, 'nlcli.engine.api.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({MODEL_SIDE!r}) or m == 'torch')\n"
        "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == ""


def test_no_module_over_300_lines():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "nlcli").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 300}
    assert big == {}
