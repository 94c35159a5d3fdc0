#!/usr/bin/env bash
# The GPU check (issue 29): 9 minutes at most on one H100 or H200 (each part has a time limit; together 540 s).
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
# Writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md (a RESULTS.md section) and OUT_DIR/gpu_check.log;
# OUT_DIR defaults to $OUT (the device machine's output folder), else runs/gpu_check. Paste the section
# into RESULTS.md with: python benchmarks/gpu_check.py report PARTS_DIR --into benchmarks/RESULTS.md,
# or copy gpu_check.md by hand. --dry-run: tiny shapes on this machine's device (CI runs it on CPU).
# Wheels in .whl/ (TRL and what it needs that the GPU image lacks: datasets, dill, multiprocess) are
# installed into a private folder first; see the README's GPU section.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY=--dry-run; shift; fi
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -z "$DRY" ] && compgen -G ".whl/*.whl" >/dev/null; then
  # the folder's name must contain "site-packages": dill (datasets' fingerprints) pickles modules found
  # anywhere else by value, and fails on pyarrow's (unslothai/unsloth#9791)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check/site-packages .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check/site-packages${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
PARTS=$(mktemp -d)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
part() {  # part name(s), time limit in seconds
  echo "== $1 (limit $2 s)" | tee -a "$LOG"
  timeout --kill-after=10 "$2" "$PY" benchmarks/gpu_check.py part $1 --out "$PARTS" $DRY >>"$LOG" 2>&1
  echo "== $1: exit $?" | tee -a "$LOG"
}
if [ -n "$DRY" ]; then  # tiny shapes: every part in one process (a process start costs more than a part)
  part "env dpo dpo_1_5b lora_7b reward rollout grpo sandbox" 400
else  # the sandbox part (the quickstart's training on a GPU) is left out: its minutes go to issue 29's rows
  part env 20
  part dpo 150
  part dpo_1_5b 70
  part lora_7b 60
  part reward 50
  part rollout 140
  part grpo 50
fi
"$PY" benchmarks/gpu_check.py report "$PARTS" --out "$OUT_DIR" >>"$LOG" 2>&1
status=$?
cat "$OUT_DIR/gpu_check.md" 2>/dev/null
rm -rf "$PARTS"
exit $status
