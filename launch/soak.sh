#!/usr/bin/env bash
# Soak check: run the main command three times in a row with different seeds and check that nothing is
# left behind: no process, no file outside the output directories and the stage-0 cache, and no growth
# of the cache beyond one stage-0 model per new seed (no checkpoints or TensorBoard files in it).
#
#   launch/soak.sh [SCRATCH_DIR] [-- extra arguments for launch/hsft.py]
#
# Everything is written below SCRATCH_DIR (default: a new temporary directory): run-<seed>/ output
# directories, cache/ ($HSFT_CACHE), torch-cache/ (torch's own compile caches, which DeepSpeed's imports
# create; not hsft's) and tmp/ ($TMPDIR, must stay empty). Exit status 0 when clean.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${1:-$(mktemp -d -t hsft-soak-XXXXXX)}"
shift || true
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
SEEDS=(11 12 13)
DEEPSPEED="${DEEPSPEED:-deepspeed}"

mkdir -p "$SCRATCH/cache" "$SCRATCH/tmp" "$SCRATCH/torch-cache"
export HSFT_CACHE="$SCRATCH/cache" TMPDIR="$SCRATCH/tmp" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/torch-cache" \
    TRITON_CACHE_DIR="$SCRATCH/torch-cache/triton"
cd "$SCRATCH"
fail() { echo "soak: FAILED: $*" >&2; exit 1; }
size_of() { du -sb "$1" | cut -f1; }

marker="$SCRATCH/.started"
touch "$marker"
previous_models=0
for seed in "${SEEDS[@]}"; do
    out="$SCRATCH/run-$seed"
    echo "soak: run with seed $seed -> $out"
    "$DEEPSPEED" "$REPO/launch/hsft.py" --deepspeed "$REPO/ds_configs/zero2.json" --output-dir "$out" \
        --seed "$seed" "${EXTRA[@]}" > "$SCRATCH/run-$seed.log" 2>&1 || fail "seed $seed exited with $? (see $SCRATCH/run-$seed.log)"

    # No process of this run is left: none whose command line names its output directory.
    sleep 1
    if ps -eo pid=,args= | grep -F -- "$out" | grep -v -F -e "grep" > "$SCRATCH/left.txt"; then
        fail "processes still name $out: $(cat "$SCRATCH/left.txt")"
    fi
    rm -f "$SCRATCH/left.txt"

    # No file outside the output directories, the cache and the logs; the temporary directory is empty.
    stray="$(find "$SCRATCH" -mindepth 1 -maxdepth 1 ! -name 'run-*' ! -name cache ! -name tmp ! -name torch-cache ! -name .started \
             ! -name left.txt)"
    [[ -z "$stray" ]] || fail "files outside the output directories after seed $seed: $stray"
    [[ -z "$(ls -A "$SCRATCH/tmp")" ]] || fail "temporary files left after seed $seed: $(ls -A "$SCRATCH/tmp")"
    [[ ! -e "$out/.hsft.lock" ]] || fail "the output-directory lock was not released after seed $seed"

    # The cache holds stage-0 models only: at most one more per seed, each without checkpoints or logs.
    models=$(find "$HSFT_CACHE" -mindepth 1 -maxdepth 1 -type d -name 'base-*' | wc -l)
    (( models <= previous_models + 1 )) || fail "the cache gained $((models - previous_models)) models with seed $seed"
    extra="$(find "$HSFT_CACHE" -mindepth 1 -maxdepth 1 ! -name 'base-*' ! -name tb)"
    [[ -z "$extra" ]] || fail "unexpected entries in the cache: $extra"
    leftovers="$(find "$HSFT_CACHE" -path '*/checkpoints/*' -o -path '*/tb/*' -type f)"
    [[ -z "$leftovers" ]] || fail "training leftovers in the cache: $leftovers"
    previous_models=$models
    echo "soak: seed $seed clean; cache $(size_of "$HSFT_CACHE") bytes in $models stage-0 model(s)"
done

# Nothing was written into the repository either.
changed="$(find "$REPO" -newer "$marker" -type f ! -path '*/.git/*' ! -path '*/__pycache__/*' ! -path '*/.venv/*' \
           ! -path '*/build/*' ! -path '*/.torch_ext/*' | head -5)"
[[ -z "$changed" ]] || fail "files written into the repository: $changed"
echo "soak: OK (${#SEEDS[@]} runs, scratch $SCRATCH)"
