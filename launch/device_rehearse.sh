#!/usr/bin/env bash
# The rehearsal of the paper's run on one GPU, sized for about 12 minutes in two calls of at most
# 10 minutes each (repository root):
#   setup     the bundle's wheels into a venv and the CUDA ops for this card (launch/device_check.sh's
#             install and build steps; needs launch/device_bundle.sh's .whl/ beside the tree)
#   rehearse_1b  launch/rehearse.py --shape sa2va-1b --device cuda --images 16 (bf16), HSFT and the
#             control with --hsft-cuda-graph under DeepSpeed
#   rehearse_4b  the same at sa2va-4b, eager
#   step_1b   launch/bench_step.py at sa2va-1b: HSFT uncached / cached / CUDA graph, the cached step's profile
# Each step logs to its own file and has a time cap; a failed step is recorded and the next runs.
# OUT gets summary.md (per step: pass/fail, time; each rehearsal.md; the step table) and all.tar.gz.
#
# Usage: bash launch/device_rehearse.sh [OUT]     (default OUT: results/device_rehearse)
#   first call:  HSFT_REHEARSE_ONLY="setup rehearse_1b step_1b" bash launch/device_rehearse.sh "$OUT"
#   second call: HSFT_REHEARSE_ONLY=rehearse_4b bash launch/device_rehearse.sh "$OUT"   (reuses the venv)
# Environment: PYTHON (default python3), HSFT_REHEARSE_ONLY (steps to run, default all)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-results/device_rehearse}"
PYTHON="${PYTHON:-python3}"
WORK="build/device_rehearse"
ONLY="${HSFT_REHEARSE_ONLY:-setup rehearse_1b rehearse_4b step_1b}"
rm -rf "$OUT" "$WORK/logs"
mkdir -p "$OUT" "$WORK/logs"
STEPS=()
FAILED=0

step() {  # step NAME CAP COMMAND...
  local name="$1" cap="$2" began status
  shift 2
  case " $ONLY " in *" $name "*) ;; *) return ;; esac
  echo "== $name (up to ${cap} s)"
  began=$(date +%s)
  timeout --kill-after=15 "$cap" "$@" > "$WORK/logs/$name.log" 2>&1
  status=$?
  if [ "$status" -eq 0 ]; then STEPS+=("| $name | pass | $(($(date +%s) - began)) s |")
  else STEPS+=("| $name | FAIL: exit $status | $(($(date +%s) - began)) s |"); FAILED=1; fi
  tail -n 4 "$WORK/logs/$name.log"
}

step setup 120 env HSFT_CHECK_ONLY="install build" PYTHON="$PYTHON" bash launch/device_check.sh "$WORK/check"
PY="$PWD/build/device_check/venv/bin/python"
[ -x "$PY" ] || PY="$PYTHON"
LIB="$(ls build/device_check/ops/_C*.so 2>/dev/null | head -n 1)"
[ -z "$LIB" ] || export HSFT_OPS_LIBRARY="$PWD/$LIB"
export PATH="$(dirname "$PY"):$PATH" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step rehearse_1b 210 "$PY" launch/rehearse.py --overwrite --shape sa2va-1b --device cuda --images 16 \
  --output-dir "$WORK/sa2va-1b" --main-args="--hsft-cuda-graph"
step rehearse_4b 330 "$PY" launch/rehearse.py --overwrite --shape sa2va-4b --device cuda --images 16 --output-dir "$WORK/sa2va-4b"
step step_1b 90 "$PY" launch/bench_step.py --shape sa2va-1b --stage hsft --device cuda --dtype bfloat16 \
  --steps 10 --warmup 3 --profile --cuda-graph --output-dir "$WORK/bench_step"

{
  echo "# device rehearsal: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo; echo "| step | result | time |"; echo "|---|---|---:|"; printf '%s\n' "${STEPS[@]}"
  for shape in sa2va-1b sa2va-4b; do
    [ -f "$WORK/$shape/rehearsal.md" ] && { echo; cat "$WORK/$shape/rehearsal.md"; }
  done
  [ -f "$WORK/logs/step_1b.log" ] && { echo; echo '```'; tail -n 20 "$WORK/logs/step_1b.log"; echo '```'; }
} > "$OUT/summary.md"
for shape in sa2va-1b sa2va-4b; do
  [ -f "$WORK/$shape/rehearsal.json" ] && cp "$WORK/$shape/rehearsal.json" "$OUT/rehearsal_$shape.json"
done
# Logs, reports and JSON only: the checkpoints stay behind.
tar -czf "$OUT/all.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoints' "$WORK" 2>/dev/null
cat "$OUT/summary.md"
exit "$FAILED"
