#!/usr/bin/env bash
# Prepares, on a machine with network, what an offline GPU machine needs to run hsft:
#   .whl/            every wheel that machine lacks (Python 3.12, manylinux x86_64), with
#                    .whl/requirements.txt naming them; torch and its CUDA libraries are NOT included
#                    (the GPU machine has its own torch), so the folder stays small enough to travel
#                    with the working tree
#   .hsft_cache/     the pre-trained stage-0 model of the embedded default (the main command reuses
#                    it through HSFT_CACHE instead of pre-training again)
# deepspeed has no wheel on the index: it is built here from its sdist with DS_BUILD_OPS=0 (a pure
# Python wheel; its ops compile just in time where they are used).
#
# Usage (repository root): bash launch/device_bundle.sh [--check] [--no-base]
#   --check    then install the bundle offline (pip --no-index) into a fresh Python 3.12 venv in
#              which a metadata-only placeholder stands for the GPU machine's torch, run `pip check`,
#              and import the bundled packages that do not import torch (no CPU build of torch for
#              Python 3.12 is on the index, so hsft itself is first imported on the GPU machine)
#   --no-base  do not run stage 0 to fill .hsft_cache/
# Environment:
#   PYTHON                 Python with torch, setuptools and wheel, used to build the deepspeed wheel
#                          and run stage 0 (default: python)
#   HSFT_WHEEL_CACHE       download cache (default ~/.cache/hsft/wheels); a second run downloads nothing
#   HSFT_TARGET_TORCH      torch version installed on the GPU machine (default 2.11.0)
#   HSFT_DEEPSPEED         deepspeed version to build (default 0.19.8)
#   PYTHON312              Python 3.12 for --check (default: python3.12 on PATH, else pyenv's 3.12)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
CACHE="${HSFT_WHEEL_CACHE:-$HOME/.cache/hsft/wheels}"
TARGET_TORCH="${HSFT_TARGET_TORCH:-2.11.0}"
DEEPSPEED_VERSION="${HSFT_DEEPSPEED:-0.19.8}"
PYTHON312="${PYTHON312:-}"
if [ -z "$PYTHON312" ]; then
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" --version >/dev/null 2>&1; then PYTHON312="$candidate"; break; fi
  done
fi
BUNDLE=.whl
CHECK=0
BASE=1
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --no-base) BASE=0 ;;
    *) echo "device_bundle.sh: unknown argument '$arg' (expected --check or --no-base)" >&2; exit 2 ;;
  esac
done

# The GPU machine's Python and platform. `--isolated` ignores this machine's pip settings, which
# point at local CPU wheels; the wheels must come from the public index.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
# Already on the GPU machine: torch and its dependencies (torch alone is ~900 MB) are never
# downloaded; numpy (16 MB; the installed transformers needs it) is downloaded only for --check,
# where it stands for the GPU machine's copy. The bundle must fit the 64 MiB working tree.
# Small packages that torch also needs (typing_extensions, filelock, fsspec ...) are bundled: the
# newest releases the resolver picks may need newer ones than the machine has.
PROVIDED='^(torch|triton|nvidia-.*|cuda-.*)$'
PREINSTALLED='^(numpy)$'

mkdir -p "$CACHE" "$BUNDLE"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== deepspeed $DEEPSPEED_VERSION wheel (built from the sdist, DS_BUILD_OPS=0)"
ds_dir="$CACHE/deepspeed-$DEEPSPEED_VERSION"
if ! ls "$ds_dir"/deepspeed-*.whl >/dev/null 2>&1; then
  mkdir -p "$ds_dir"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --isolated --disable-pip-version-check --no-deps --no-build-isolation --no-binary deepspeed \
    "deepspeed==$DEEPSPEED_VERSION" -w "$ds_dir"
fi
ls "$ds_dir"/deepspeed-*.whl

echo "== resolving the dependencies for Python 3.12 (torch stands for the GPU machine's $TARGET_TORCH)"
# A metadata-only placeholder for the installed torch lets the resolver check the other packages'
# torch requirements without downloading torch; its local version label keeps the index's torch out.
stub="$work/stub/torch-$TARGET_TORCH+installed.dist-info"
mkdir -p "$stub"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: %s+installed\n' "$TARGET_TORCH" > "$stub/METADATA"
printf 'Wheel-Version: 1.0\nGenerator: hsft\nRoot-Is-Purelib: true\nTag: py3-none-any\n' > "$stub/WHEEL"
: > "$stub/RECORD"
(cd "$work/stub" && "$PYTHON" -m zipfile -c "$work/torch-$TARGET_TORCH+installed-py3-none-any.whl" \
  "torch-$TARGET_TORCH+installed.dist-info")
# The package's own dependencies (pyproject.toml), deepspeed's, and pytest for the device tests;
# not matplotlib (with its dependencies it would push the bundle past what travels): the GPU check's
# experiments run without it and say that their plots were not drawn.
"$PYTHON" - "$work/requirements.in" "$TARGET_TORCH" "$DEEPSPEED_VERSION" <<'PY'
import sys
import tomllib
from pathlib import Path

out, torch_version, ds_version = sys.argv[1:]
deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
lines = [d for d in deps if not d.replace(" ", "").startswith(("torch>", "torch=", "deepspeed", "matplotlib"))]
lines += [f"torch=={torch_version}+installed", f"deepspeed=={ds_version}", "pytest>=8"]
Path(out).write_text("\n".join(lines) + "\n")
PY
"$PYTHON" -m pip install --isolated --disable-pip-version-check --quiet --dry-run --ignore-installed --target "$work/target" \
  --report "$work/report.json" "${TARGET[@]}" --find-links "$work" --find-links "$ds_dir" \
  -r "$work/requirements.in"

"$PYTHON" - "$work/report.json" "$PROVIDED" "$PREINSTALLED" "$work/pins.txt" "$work/preinstalled.txt" <<'PY'
import json
import re
import sys

report, provided, preinstalled, pins, preinstalled_pins = sys.argv[1:]
keep, already = [], []
for item in json.load(open(report))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if re.match(preinstalled, name, re.IGNORECASE):
        already.append(f"{name}=={version}")
    elif not re.match(provided, name, re.IGNORECASE):
        keep.append(f"{name}=={version}")
open(pins, "w").write("\n".join(sorted(keep, key=str.lower)) + "\n")
open(preinstalled_pins, "w").write("\n".join(already) + "\n")
PY

echo "== downloading $(wc -l < "$work/pins.txt") wheels into $BUNDLE (cached in $CACHE)"
grep -hv '^deepspeed==' "$work/pins.txt" "$work/preinstalled.txt" | grep . > "$work/download.txt"
"$PYTHON" -m pip download --isolated --disable-pip-version-check --quiet --no-deps "${TARGET[@]}" -d "$CACHE/py312" -r "$work/download.txt"
# Copy exactly the pinned wheels: a stale wheel from an earlier bundle must not travel.
find "$BUNDLE" -mindepth 1 -maxdepth 1 -name '*.whl' -delete
"$PYTHON" - "$work/pins.txt" "$CACHE/py312" "$ds_dir" "$BUNDLE" <<'PY'
import re
import shutil
import sys
from pathlib import Path

pins, *sources, bundle = sys.argv[1:]
def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
wheels = {}
for source in sources:
    for wheel in Path(source).glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        wheels[(norm(name), version)] = wheel
missing = []
for line in Path(pins).read_text().split():
    name, version = line.split("==")
    wheel = wheels.get((norm(name), version))
    if wheel is None:
        missing.append(line)
    else:
        shutil.copy2(wheel, bundle)
if missing:
    sys.exit(f"device_bundle.sh: no wheel for {', '.join(missing)} in {', '.join(sources)}")
PY
cp "$work/pins.txt" "$BUNDLE/requirements.txt"
echo "bundle: $(ls "$BUNDLE"/*.whl | wc -l) wheels, $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE"

if [ "$BASE" = 1 ]; then
  echo "== stage 0 of the embedded default into .hsft_cache/ (reused when already there)"
  HSFT_CACHE="$PWD/.hsft_cache" "$(dirname "$(command -v "$PYTHON")")/deepspeed" --num_gpus 1 launch/hsft.py \
    --deepspeed ds_configs/zero2.json --stages base --output-dir "$work/base_run" > "$work/base.log" 2>&1 \
    || { tail -n 20 "$work/base.log"; echo "device_bundle.sh: stage 0 failed" >&2; exit 1; }
  echo "stage 0 cached: $(du -sh .hsft_cache | cut -f1) in .hsft_cache"
fi

# .whl/ and .hsft_cache/ are ignored by git, so a copy of the working tree takes them only when asked
# (both must be named to travel); together with the rest of the tree they must stay under 64 MiB.
carried_kib=$(du -sck "$BUNDLE" $( [ -d .hsft_cache ] && echo .hsft_cache) | tail -n 1 | cut -f1)
total_kib=$(du -sk --exclude=.git --exclude=.venv --exclude=build --exclude=results --exclude=runs . | cut -f1)
echo "to carry (.whl/ and .hsft_cache/): $((carried_kib / 1024)) MiB; working tree without .git, .venv, build," \
     "results, runs: $((total_kib / 1024)) MiB (limit 64)"
if [ "$total_kib" -gt $((64 * 1024)) ]; then
  echo "device_bundle.sh: the working tree is over 64 MiB; it will not travel" >&2
  exit 1
fi

if [ "$CHECK" = 1 ]; then
  [ -n "$PYTHON312" ] || { echo "device_bundle.sh: --check needs Python 3.12 (set PYTHON312)" >&2; exit 1; }
  echo "== offline install into a Python 3.12 venv ($PYTHON312)"
  "$PYTHON312" -m venv "$work/venv312"
  venv_python="$work/venv312/bin/python"
  # What the GPU machine has already: its torch (the placeholder) and numpy.
  "$venv_python" -m pip install --isolated --disable-pip-version-check --quiet --no-index \
    "$work/torch-$TARGET_TORCH+installed-py3-none-any.whl" --find-links "$CACHE/py312" -r "$work/preinstalled.txt"
  "$venv_python" -m pip install --isolated --disable-pip-version-check --quiet --no-index --find-links "$BUNDLE" -r "$BUNDLE/requirements.txt"
  "$venv_python" -m pip check
  "$venv_python" -c "
import hjson, cpuinfo, msgpack, pydantic, numpy, PIL, safetensors, tokenizers, huggingface_hub, tensorboard, pytest
import transformers, importlib.metadata as m
print('imported the bundle on Python 3.12: transformers', transformers.__version__, 'deepspeed', m.version('deepspeed'),
      'tensorboard', tensorboard.__version__)
"
fi
