"""The GPU check's Python parts run on the CPU (tiny model): the speed table and the parity check.

benchmarks/gpu_check.sh runs them on a GPU machine; here they run with `--device cpu` so a change
that breaks them is caught before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_speed_table_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("gpu_bench.py", "--device", "cpu", "--shape", "tiny", "--batch-sizes", "1,4",
                "--steps", "3", "--prefill-tokens", "48", "--prefill-reps", "1",
                "--decode-context", "8", "--json", str(out), env={"NL_PEAK_BW_GBPS": "50"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for metric in ("decode bs=1 tok/s", "decode bs=1 fraction of roofline", "decode bs=4 tok/s",
                   "prefill tok/s (48 tokens)"):
        assert metric in table
    assert "peak bandwidth: 50 GB/s" in table
    result = json.loads(out.read_text())
    eager = result["eager"]
    assert result["cuda_graphs"] is None and eager["graphs"] is False  # never graphs on the CPU
    assert eager["decode_bs1_tok_s"] > 0 and eager["prefill_tok_s"] > 0
    expected = eager["weight_bytes"] * eager["decode_bs1_tok_s"] / 50e9
    assert eager["decode_bs1_roofline"] == pytest.approx(expected)


def test_parity_check_on_cpu():
    proc = _run("gpu_parity.py", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity: ok" in proc.stdout
    assert proc.stdout.count("prompt ") == 6


def test_peak_bandwidth_table(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_models import peak_bandwidth
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.delenv("NL_PEAK_BW_GBPS", raising=False)
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2000e9
    assert peak_bandwidth("NVIDIA H200") == 4800e9
    assert peak_bandwidth("Some Future GPU") is None
    monkeypatch.setenv("NL_PEAK_BW_GBPS", "1234")
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 1234e9


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
