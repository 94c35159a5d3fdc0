#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs alignflow into it (idempotent; fast when up to date).
#   bash scripts/setup.sh          # what the quickstart needs
#   bash scripts/setup.sh --test   # also pytest and Debian's chromium (the MLflow UI test drives it)
# torch is pinned to the CPU build 2.13.0; on a GPU machine set TORCH_SPEC, e.g. TORCH_SPEC="torch".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_install "${TORCH_SPEC:-torch==2.13.0}"
if [ "${1:-}" = "--test" ]; then
  pip_install -e ".[dev]"
  # Debian's chromium drives the MLflow UI test; podman, runc and mmdebstrap build and run the image's test
  missing=()
  for tool in chromium podman runc mmdebstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
    else
      echo "note: install Debian's ${missing[*]} (the MLflow UI and image tests are skipped without them)" >&2
    fi
  fi
else
  pip_install -e .
fi
