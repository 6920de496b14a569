#!/usr/bin/env bash
# One prepared GPU run, sized for at most 5 minutes on one GPU of an offline machine (repository root):
#   install  the wheels of .whl/ (launch/device_bundle.sh) into a venv over the machine's Python
#            (--system-site-packages: its CUDA torch stays in use), offline
#   build    the CUDA ops for this card (cmake, HSFT_CUDA=ON, CMAKE_CUDA_ARCHITECTURES of the GPU)
#   ops      the op tests with HSFT_REQUIRE_COMPILED_OPS=1 (the CUDA tests need the CUDA kernels)
#   bench    the kernel benchmark on cuda (eager / torch.compile / ours, 8, 16, 64 masks 256->1024,
#            forward and forward+backward)
#   main     the main command on the GPU: embedded default, bf16, stage 0 from .hsft_cache/
# and, named in HSFT_CHECK_ONLY (the kernels' own check, see docs/kernels.md):
#   kernels_fp32, kernels_bf16   the kernel benchmark at 16 x 256 -> 1024, forward+backward, against
#            eager and torch.compile, with CUDA-event / kernel / launch breakdown and the roofline,
#            checked against the goals (--targets: 5x eager, 1.5x torch.compile, 40 % of the roofline)
#   memcheck, racecheck          the CUDA op tests under compute-sanitizer (--tool memcheck / racecheck)
# Each step logs to its own file; a failed step is recorded and the next one still runs; the script
# exits non-zero at the end when any step failed. OUT gets few files (a GPU machine hands back
# only a handful): summary.md (card, versions, pass/fail and time per step, the benchmark table,
# the run's report), all.tar.gz (every log and result), bench_kernels.json / .csv and report.md.
#
# Usage: bash launch/device_check.sh [OUT] [--cpu]
#   OUT    results folder (default results/device_check); scratch goes to build/device_check
#   --cpu  dry run without a GPU: skips the install (the wheels are for the GPU machine's Python),
#          builds the CPU ops, runs the op tests, the quick benchmark and a tiny configuration of the
#          main command on the CPU (fp32), with ten times the time caps (it checks the flow, not time)
# Environment: PYTHON (default python3), HSFT_CHECK_SECONDS (time budget, default 290)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="results/device_check"
CPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -*) echo "device_check.sh: unknown option '$arg' (expected --cpu)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
PYTHON="${PYTHON:-python3}"
BUDGET="${HSFT_CHECK_SECONDS:-290}"
WORK="build/device_check"
START=$(date +%s)
rm -rf "$OUT" "$WORK/run" "$WORK/graph_base" "$WORK/graph_eager" "$WORK/graph_replayed" "$WORK/logs" "$WORK/bench"
mkdir -p "$OUT" "$WORK/logs" "$WORK/bench"
LOGS="$WORK/logs"
STEPS=()
FAILED=0
# HSFT_CHECK_ONLY="install bench_step" runs only the named steps (default: every step but cuda_graph and
# bench_step).
ONLY="${HSFT_CHECK_ONLY:-install build ops ops_without_crash bench main experiments}"
CAP_SCALE=1
[ "$CPU" = 0 ] || CAP_SCALE=10

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, within
# CAP_SECONDS and what is left of the budget; records pass / fail / skipped and the time taken.
run_step() {
  local name="$1" cap="$2" left status began took
  shift 2
  case " $ONLY " in
    *" $name "*|"  ") ;;
    *) return ;;  # not selected by HSFT_CHECK_ONLY
  esac
  cap=$((cap * CAP_SCALE))
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$cap" -lt "$left" ] || cap="$left"
  if [ "$cap" -le 5 ]; then
    STEPS+=("| $name | skipped (no time left) | 0 s |")
    FAILED=1
    return
  fi
  echo "== $name (up to ${cap} s)"
  began=$(date +%s)
  # bash -c so that a step may be one of the exported functions below.
  timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  took=$(($(date +%s) - began))
  if [ "$status" -eq 0 ]; then
    STEPS+=("| $name | pass | $took s |")
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    STEPS+=("| $name | FAIL: timed out after ${cap} s | $took s |")
    FAILED=1
  else
    STEPS+=("| $name | FAIL: exit $status | $took s |")
    FAILED=1
  fi
  tail -n 5 "$LOGS/$name.log"
}

skip_step() {
  STEPS+=("| $1 | skipped ($2) | 0 s |")
}

# ---- install -------------------------------------------------------------------------------
install_bundle() {
  [ -f .whl/requirements.txt ] || { echo "no .whl/requirements.txt: run launch/device_bundle.sh first"; return 1; }
  # The machine's torch may itself live in a virtual environment, whose packages a new venv's
  # --system-site-packages would not see: a .pth file puts that Python's site-packages on the path.
  "$PYTHON" -m venv --system-site-packages "$WORK/venv" &&
    "$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()))' \
      > "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_machine_python.pth" &&
    "$WORK/venv/bin/python" -c 'import torch' &&
    # setuptools stays the machine's: its torch pins the versions it accepts.
    grep -v '^setuptools==' .whl/requirements.txt > "$WORK/requirements.txt" &&
    "$WORK/venv/bin/python" -m pip install --no-index --find-links .whl -r "$WORK/requirements.txt" &&
    "$WORK/venv/bin/python" -c "import torch, transformers, deepspeed, hsft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
}
export -f install_bundle
export PYTHON WORK CPU
if [ "$CPU" = 1 ]; then
  skip_step install "--cpu"
  PY="$PYTHON"
else
  run_step install 50 install_bundle
  PY="$PWD/$WORK/venv/bin/python"
  [ -x "$PY" ] || PY="$PYTHON"
fi
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- build ---------------------------------------------------------------------------------
build_ops() {
  local arch flags=(-DHSFT_CUDA=OFF)
  if [ "$CPU" = 0 ]; then
    arch="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')" || return 1
    flags=(-DHSFT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch")
  fi
  cmake -S . -B "$WORK/ops" -G Ninja -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
    -DPython_EXECUTABLE="$(command -v "$PY")" && cmake --build "$WORK/ops" --parallel
}
export -f build_ops
export PY
run_step build 100 build_ops
LIB="$(ls "$WORK"/ops/_C*.so 2>/dev/null | head -n 1)"
if [ -n "$LIB" ]; then
  export HSFT_OPS_LIBRARY="$PWD/$LIB"
fi
export HSFT_REQUIRE_COMPILED_OPS=1

# ---- op tests, benchmark, main command -----------------------------------------------------
run_step ops 60 "$PY" -m pytest tests/test_ops.py -q -ra -p no:cacheprovider
if grep -q "Fatal Python error" "$LOGS/ops.log"; then
  # A crash ends pytest at that test: run the others too, so that the crash and every other result show.
  crashed="$(grep -o 'test_ops.py", line [0-9]* in [a-z_0-9]*' "$LOGS/ops.log" | head -n 1 | awk '{print $NF}')"
  run_step ops_without_crash 60 "$PY" -m pytest tests/test_ops.py -q -ra -p no:cacheprovider -k "not $crashed"
fi
DEVICE=cuda
PRECISION=bf16
# Forward and forward+backward only: the backward alone adds little and its torch.compile time
# would not fit the budget.
BENCH_ARGS=(--modes fwd fwd+bwd)
MAIN_ARGS=()
if [ "$CPU" = 1 ]; then
  DEVICE=cpu
  PRECISION=fp32
  BENCH_ARGS+=(--quick --repeats 2)
  MAIN_ARGS=(--base-epochs 2 --base-pool-size 16 --data-synthetic-train 8 --data-synthetic-test 4
             --data-synthetic-size 64 --lora-epochs 1 --lora-rank 8 --hsft-epochs 1)
fi
run_step bench 70 "$PY" launch/bench_kernels.py --device "$DEVICE" "${BENCH_ARGS[@]}" --output-dir "$WORK/bench"
# The kernels at the goals' shape, in float32 and bfloat16 (on --cpu: a small shape, no targets).
KERNEL_ARGS=(--shapes "16x256->1024" --modes fwd+bwd --repeats 20 --warmup 3 --targets)
[ "$CPU" = 0 ] || KERNEL_ARGS=(--shapes "4x64->256" --modes fwd+bwd --repeats 2 --warmup 1)
for pair in fp32:float32 bf16:bfloat16; do
  run_step "kernels_${pair%%:*}" "${HSFT_CHECK_KERNELS_SECONDS:-120}" "$PY" launch/bench_kernels.py \
    --device "$DEVICE" --dtype "${pair#*:}" "${KERNEL_ARGS[@]}" --output-dir "$WORK/bench"
done
sanitize() {
  local tool="$1" sanitizer
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
  [ -n "$sanitizer" ] || { echo "no compute-sanitizer on this machine"; return 1; }
  "$sanitizer" --tool "$tool" --error-exitcode 3 --target-processes all \
    "$PY" -m pytest tests/test_ops.py -q -ra -p no:cacheprovider -k "cuda and not fake_gpu"
}
export -f sanitize
if [ "$CPU" = 1 ]; then
  skip_step memcheck "--cpu: compute-sanitizer needs a GPU"
  skip_step racecheck "--cpu: compute-sanitizer needs a GPU"
else
  run_step memcheck "${HSFT_CHECK_SANITIZER_SECONDS:-120}" sanitize memcheck
  run_step racecheck "${HSFT_CHECK_SANITIZER_SECONDS:-120}" sanitize racecheck
fi
# HSFT_CHECK_MAIN_ARGS: extra options of the main command (e.g. "--hsft-compile default").
read -r -a EXTRA_MAIN_ARGS <<< "${HSFT_CHECK_MAIN_ARGS:-}"
run_step main "${HSFT_CHECK_MAIN_SECONDS:-200}" env HSFT_CACHE="$PWD/.hsft_cache" "$(dirname "$(command -v "$PY")")/deepspeed" --num_gpus 1 \
  launch/hsft.py --deepspeed ds_configs/zero2.json --precision "$PRECISION" --output-dir "$WORK/run" "${MAIN_ARGS[@]}" \
  "${EXTRA_MAIN_ARGS[@]}"

# --hsft-cuda-graph against the eager HSFT step: the same command from the same DPO model (the main
# step's, else a pipeline up to DPO), with and without the option; the losses step by step, the time.
cuda_graph_check() {
  local ds base="$WORK/run" form
  ds="$(dirname "$(command -v "$PY")")/deepspeed"
  if [ ! -d "$base/dpo/model" ]; then
    base="$WORK/graph_base"
    env HSFT_CACHE="$PWD/.hsft_cache" "$ds" --num_gpus 1 launch/hsft.py --deepspeed ds_configs/zero2.json \
      --precision "$PRECISION" --stages base,lora,dpo --output-dir "$base" || return 1
  fi
  for form in eager replayed; do
    env HSFT_CACHE="$PWD/.hsft_cache" "$ds" --num_gpus 1 launch/hsft.py --deepspeed ds_configs/zero2.json \
      --precision "$PRECISION" --recipe tiny --model "$base/dpo/model" --stages mining,hsft \
      --hsft-cuda-graph "$([ "$form" = replayed ] && echo true || echo false)" --output-dir "$WORK/graph_$form" ||
      return 1
  done
  "$PY" - "$WORK/graph_eager/hsft/metrics.json" "$WORK/graph_replayed/hsft/metrics.json" <<'PY'
import json, sys
eager, replayed = (json.load(open(path)) for path in sys.argv[1:3])
diff = max(abs(a - b) for a, b in zip(eager["losses"], replayed["losses"]))
print(f"hsft losses: {len(eager['losses'])} eager / {len(replayed['losses'])} replayed steps, "
      f"max |difference| {diff:.3g}; first {eager['losses'][0]:.5f} / {replayed['losses'][0]:.5f}, "
      f"last {eager['losses'][-1]:.5f} / {replayed['losses'][-1]:.5f}")
print(f"hsft stage seconds: eager {eager['seconds']:.2f}, replayed {replayed['seconds']:.2f}")
sys.exit(0 if len(eager["losses"]) == len(replayed["losses"]) and diff < 1e-2 else 1)
PY
}
export -f cuda_graph_check
export PRECISION
if [ "$CPU" = 1 ]; then
  skip_step cuda_graph "--cpu: CUDA graphs need a GPU"
else
  run_step cuda_graph "${HSFT_CHECK_CUDA_GRAPH_SECONDS:-200}" cuda_graph_check
fi

# The experiments runner on the accelerator: the smoke suite, one seed (every kind of run it makes).
run_step experiments "${HSFT_CHECK_EXPERIMENTS_SECONDS:-150}" env HSFT_CACHE="$PWD/.hsft_cache" \
  "$(dirname "$(command -v "$PY")")/deepspeed" --num_gpus 1 launch/experiments.py --deepspeed ds_configs/zero2.json \
  --suite smoke --seeds 0 --output-dir "$WORK/experiments"

# The real-shape step benchmark (random weights at Sa2VA-1B's sizes): LoRA and HSFT, cached and not.
# HSFT_CHECK_BENCH_STEP_ARGS replaces its options after --device (e.g. "--stage hsft --steps 10 --warmup 3
# --profile --compile default,reduce-overhead").
read -r -a BENCH_STEP_ARGS <<< "${HSFT_CHECK_BENCH_STEP_ARGS:---shape sa2va-1b --stage lora,hsft --dtype bfloat16 --steps 3 --warmup 1}"
run_step bench_step "${HSFT_CHECK_BENCH_STEP_SECONDS:-150}" "$PY" launch/bench_step.py --device "$DEVICE" \
  "${BENCH_STEP_ARGS[@]}" --output-dir "$WORK/bench_step"

# ---- summary -------------------------------------------------------------------------------
{
  echo "# device check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- $("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>&1 | tail -n 1)"
  echo "- $("$PY" -c 'import importlib.metadata as m; print(" | ".join(f"{p} {m.version(p)}" for p in ("transformers", "deepspeed", "peft")))' 2>&1 | tail -n 1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo none)"
  echo "- mode: $([ "$CPU" = 1 ] && echo "--cpu (dry run)" || echo gpu), total $(($(date +%s) - START)) s"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "## op tests"
  echo '```'
  tail -n 15 "$LOGS/ops.log" 2>/dev/null
  echo '```'
  echo
  echo "## kernel benchmark"
  sed -n '/^| device/,/^$/p' "$LOGS/bench.log" 2>/dev/null
  for name in kernels_fp32 kernels_bf16; do
    [ -f "$LOGS/$name.log" ] || continue
    echo
    echo "## $name (forward+backward)"
    sed -n '/^| device/,/^$/p' "$LOGS/$name.log"
    grep "^target met\|^TARGET MISSED" "$LOGS/$name.log"
  done
  for name in memcheck racecheck; do
    [ -f "$LOGS/$name.log" ] || continue
    echo
    echo "## compute-sanitizer $name"
    echo '```'
    grep "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed" "$LOGS/$name.log" | tail -n 5
    echo '```'
  done
  echo
  echo "## main command"
  if [ -f "$WORK/run/report.md" ]; then cat "$WORK/run/report.md"; else tail -n 20 "$LOGS/main.log" 2>/dev/null; fi
  echo
  echo "## --hsft-cuda-graph against eager HSFT"
  grep "^hsft \(losses\|stage seconds\)" "$LOGS/cuda_graph.log" 2>/dev/null
  echo
  echo "## real-shape step (bench_step)"
  sed -n '/ on .* threads), /,$p' "$LOGS/bench_step.log" 2>/dev/null
  echo
  echo "## experiments (smoke suite)"
  if [ -f "$WORK/experiments/results.md" ]; then sed -n '/^## 4.4.1/,/^\*\*Reading/p' "$WORK/experiments/results.md"
  else tail -n 20 "$LOGS/experiments.log" 2>/dev/null; fi
} > "$OUT/summary.md"
cp "$WORK"/bench/*.json "$WORK"/bench/*.csv "$OUT/" 2>/dev/null
cp "$WORK/run/report.md" "$OUT/report.md" 2>/dev/null
cp "$WORK"/bench_step/*.json "$OUT/" 2>/dev/null
cp "$WORK/experiments/results.md" "$OUT/experiments_results.md" 2>/dev/null
# Logs and results; no weights or checkpoints (they would not fit what comes back).
tar -czf "$OUT/all.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='global_step*' \
  -C "$WORK" logs bench $(cd "$WORK" && ls -d run bench_step experiments/results.json 2>/dev/null)
cat "$OUT/summary.md"
exit "$FAILED"
