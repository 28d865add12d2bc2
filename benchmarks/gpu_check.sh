#!/usr/bin/env bash
# The GPU check, for a fresh NVIDIA machine (under 8 minutes): install, run the gpu-marked tests,
# check greedy parity with transformers in bfloat16, and print the speed table.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Env: PYTHON (default python3), VENV (default .venv-gpu; set VENV= to use PYTHON's environment),
# NL_PEAK_BW_GBPS (override the device's peak memory bandwidth), OUT (a folder for the results,
# default benchmarks/out). Exit code: non-zero when any step fails; the table is printed anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
VENV=${VENV-.venv-gpu}
start=$SECONDS
stage() { echo; echo "== $1 ($((SECONDS - start)) s)"; }
status=0

stage "install"
if [ -n "$VENV" ]; then
  "$PYTHON" -m venv "$VENV" && PYTHON="$VENV/bin/python"
fi
# torch from the default index is the CUDA build; it pulls in its matching triton.
"$PYTHON" -m pip install -q --upgrade pip >/dev/null
"$PYTHON" -m pip install -q torch==2.13.0 || exit 1
"$PYTHON" -m pip install -q -e '.[test]' || exit 1
"$PYTHON" - <<'PY' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

stage "gpu-marked tests"
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${files[@]}" 2>&1 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "greedy parity with transformers (bfloat16)"
"$PYTHON" benchmarks/gpu_parity.py 2>&1 | grep -v -e "Loading weights" -e "Writing model" | tee "$OUT/parity.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "speed: Llama-3.2-1B shape, random weights"
"$PYTHON" benchmarks/gpu_bench.py --json "$OUT/bench.json" 2>"$OUT/bench.log" | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; tail -20 "$OUT/bench.log"; }

stage "done: exit $status"
exit $status
