#!/usr/bin/env bash
# SGLang's router (the `sglang-router` registry package, a 30 MB wheel, 89 MB installed)
# in its own venv, .venv-router, so its dependency pins never touch nl's .venv. Only
# tests/test_sglang_router.py uses it (skipped without it); `make test` runs this (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
.venv-router/bin/python -c "import sglang_router" 2>/dev/null && exit 0
[ -x .venv-router/bin/python ] || "$PY" -m venv .venv-router
# pip's notes about this machine's local index folders are noise; its errors are not.
.venv-router/bin/python -m pip --disable-pip-version-check -q install "sglang-router==0.3.2" \
    2> >(grep -v "is ignored" >&2)
.venv-router/bin/python -c "import sglang_router" || { echo "sglang-router set-up incomplete" >&2; exit 1; }
