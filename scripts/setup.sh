#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs alignflow into it (idempotent; fast when up to date).
# torch is pinned to the CPU build 2.13.0; on a GPU machine set TORCH_SPEC, e.g. TORCH_SPEC="torch".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
