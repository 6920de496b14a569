#!/usr/bin/env bash
# Builds the CUDA op library hsft/_C (CMakeLists.txt with HSFT_CUDA=ON: the package's sources and
# flags, sm_80 and sm_90) on a machine that has nvcc but no GPU and possibly a CPU build of torch,
# then checks that it links and holds the CUDA kernels for every architecture.
#
#   0. compiles each csrc/cuda/*.cu (they need no torch headers) with nvcc -Xptxas -v for every
#      architecture and prints each kernel's registers, stack, shared memory and spills; fails when a
#      kernel spills registers to local memory (with --report-only it stops there);
#   1. downloads the CUDA build of the installed torch version from the public index (about 530 MB,
#      once: kept in the cache) and unpacks its headers, CMake files and libraries; it is never
#      imported, so the CPU torch of this machine stays in use;
#   2. configures and builds with cmake against it (HSFT_TORCH_DIR);
#   3. checks that every undefined symbol of _C is defined by a library it needs (torch, the CUDA
#      runtime, the C++ runtime) or is a Python API symbol, and, with cuobjdump (from the
#      nvidia-cuda-cuobjdump wheel when the toolkit has none), that the library holds the hsft CUDA
#      kernels for each architecture; prints their register and shared memory use.
#
# Usage (repository root): bash launch/build_cuda_ops.sh [--report-only] [OUT]   (default build/cuda_ops)
# Environment:
#   PYTHON             the Python whose torch version is built against (default: python)
#   HSFT_WHEEL_CACHE   download cache (default ~/.cache/hsft/wheels)
#   NVCC               the CUDA compiler (default: nvcc on PATH)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
REPORT_ONLY=0
if [ "${1:-}" = "--report-only" ]; then
  REPORT_ONLY=1
  shift
fi
OUT="${1:-build/cuda_ops}"
CACHE="${HSFT_WHEEL_CACHE:-$HOME/.cache/hsft/wheels}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
# The kernels the library must hold for each architecture (names as in csrc/cuda/*.cu).
KERNELS=(dice_bce_forward_kernel dice_bce_backward_kernel upsample_kernel mask_stats_kernel)
ARCHS=(sm_80 sm_90)

fail() { echo "build_cuda_ops.sh: $*" >&2; exit 1; }
step() { echo "== $* ($(date +%T))"; }

# Path of FILE inside the nvidia-PACKAGE wheel matching SPEC (downloaded and unpacked once into the
# cache). Used for the parts of the CUDA toolkit that this machine's nvcc installation lacks.
nvidia_file() {
  local package="$1" file="$2" spec="$3" dir="$CACHE/nvidia-$1" found
  found="$(find "$dir" -name "$file" 2>/dev/null | head -n 1 || true)"
  if [ -z "$found" ]; then
    echo "fetching nvidia-$package$spec (the toolkit has no $file)" >&2
    "$PYTHON" -m pip download --isolated --disable-pip-version-check --no-deps --only-binary=:all: --quiet \
      "nvidia-$package$spec" -d "$dir" >&2 || fail "could not download nvidia-$package$spec"
    (cd "$dir" && "$PYTHON" -m zipfile -e "$(ls nvidia_*.whl | head -n 1)" .) || fail "could not unpack nvidia-$package"
    found="$(find "$dir" -name "$file" | head -n 1)"
    [ -n "$found" ] || fail "the nvidia-$package wheel has no $file"
  fi
  echo "$found"
}

[ -n "$NVCC" ] && [ -x "$NVCC" ] || fail "no nvcc found (set NVCC or put nvcc on PATH)"

step "registers and spills per kernel (nvcc -Xptxas -v)"
mkdir -p "$OUT.ptxas"
GENCODE=()
for arch in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_${arch#sm_},code=$arch"); done
pids=()
for source in csrc/cuda/*.cu; do
  name="$(basename "$source" .cu)"
  "$NVCC" -c "$source" -o "$OUT.ptxas/$name.o" -std=c++17 -O3 -Icsrc "${GENCODE[@]}" -Xptxas -v \
    > "$OUT.ptxas/$name.log" 2>&1 &
  pids+=("$!")
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$OUT.ptxas"/*.log >&2; fail "nvcc failed"; }; done
"$PYTHON" - "$OUT.ptxas" <<'PY'
import re
import subprocess
import sys
from pathlib import Path

# ptxas -v prints, per kernel and architecture: "Compiling entry function 'NAME' for 'sm_XX'", then
# "Function properties for NAME" with the stack frame and spills, then "Used N registers, ...".
rows, kernel, arch, spills = [], None, None, []
for log in sorted(Path(sys.argv[1]).glob("*.log")):
    for line in log.read_text().splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            kernel, arch = entry.groups()
            frame = stores = loads = 0
            continue
        props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if props and kernel:
            frame, stores, loads = map(int, props.groups())
            continue
        used = re.search(r"Used (\d+) registers(.*)", line)
        if used and kernel:
            smem = re.search(r"(\d+) bytes smem", used.group(2))
            rows.append((log.stem, kernel, arch, int(used.group(1)), frame, stores, loads,
                         int(smem.group(1)) if smem else 0))
            if stores or loads:
                spills.append(kernel)
            kernel = None
names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout.split("\n")
print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} {'smem':>5}  kernel")
for row, name in zip(rows, names):
    short = name.replace("hsft::cuda::(anonymous namespace)::", "").replace("hsft::", "")
    short = re.sub(r"\(.*", "", short.removeprefix("void "))
    print(f"{row[2]:6} {row[3]:>4} {row[4]:>5} {row[5]:>8} {row[6]:>8} {row[7]:>5}  {short}")
if not rows:
    sys.exit("build_cuda_ops.sh: ptxas reported no kernels")
if spills:
    sys.exit(f"build_cuda_ops.sh: {len(spills)} kernel builds spill registers to local memory")
print(f"no spills in {len(rows)} kernel builds")
PY
[ "$REPORT_ONLY" = 1 ] && exit 0
command -v cmake >/dev/null || fail "cmake not found"
command -v ninja >/dev/null || fail "ninja not found"
# The version only, read from the package metadata: importing torch is not needed.
TORCH_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')" \
  || fail "$PYTHON has no torch installed"
# The toolkit's root as nvcc itself sees it (nvcc may be a wrapper script elsewhere on PATH); torch's
# CMake files look for the CUDA headers and runtime there.
TOOLKIT_ROOT="$(readlink -f "$("$NVCC" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')")"
[ -d "$TOOLKIT_ROOT/include" ] || fail "could not find the CUDA toolkit of $NVCC (got '$TOOLKIT_ROOT')"
CUDA_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
mkdir -p "$CACHE"

step "CUDA build of torch $TORCH_VERSION"
wheel="$(ls "$CACHE"/torch-"$TORCH_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
  echo "downloading torch==$TORCH_VERSION from the public index into $CACHE (about 530 MB, once)"
  # --isolated: ignore this machine's pip settings, which point at local CPU wheels.
  "$PYTHON" -m pip download --isolated --disable-pip-version-check --no-deps --only-binary=:all: --progress-bar on \
    "torch==$TORCH_VERSION" -d "$CACHE"
  wheel="$(ls "$CACHE"/torch-"$TORCH_VERSION"-*.whl | head -n 1)"
else
  echo "cached: $wheel"
fi

TORCH_DIR="$CACHE/$(basename "$wheel" .whl)/torch"
if [ ! -f "$TORCH_DIR/.unpacked" ]; then
  echo "unpacking headers, CMake files and libraries into $TORCH_DIR"
  "$PYTHON" - "$wheel" "$(dirname "$TORCH_DIR")" <<'PY'
import sys
import zipfile

wheel, dest = sys.argv[1:]
wanted = ("torch/include/", "torch/share/", "torch/lib/", "torch/version.py")
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.startswith(wanted)]
    archive.extractall(dest, members=names)
print(f"{len(names)} files")
PY
  touch "$TORCH_DIR/.unpacked"
fi
grep -q "^cuda: .*'[0-9]" "$TORCH_DIR/version.py" || fail "$wheel is not a CUDA build of torch"
grep "^__version__\|^cuda" "$TORCH_DIR/version.py"

step "configure ($OUT)"
# torch's CMake package links NVRTC into every extension; a compiler-only toolkit lacks it.
NVRTC="$(ls "$TOOLKIT_ROOT"/lib64/libnvrtc.so* 2>/dev/null | head -n 1 || true)"
[ -n "$NVRTC" ] || NVRTC="$(nvidia_file cuda-nvrtc 'libnvrtc.so.*[0-9]' "==$CUDA_VERSION.*")" || exit 1
echo "NVRTC: $NVRTC"
mkdir -p "$(dirname "$OUT")"
cmake -S . -B "$OUT" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHSFT_CUDA=ON -DHSFT_TORCH_DIR="$TORCH_DIR" \
  -DCMAKE_CUDA_COMPILER="$TOOLKIT_ROOT/bin/nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$TOOLKIT_ROOT" \
  -DCUDAToolkit_ROOT="$TOOLKIT_ROOT" -DCUDA_nvrtc_LIBRARY="$NVRTC" -DPython_EXECUTABLE="$(command -v "$PYTHON")" > "$OUT.configure.log" 2>&1 \
  || { tail -n 40 "$OUT.configure.log"; fail "cmake configure failed (log: $OUT.configure.log)"; }
grep "hsft:" "$OUT.configure.log" || true

step "build"
cmake --build "$OUT" --parallel
LIB="$(ls "$OUT"/_C*.so | head -n 1)"
echo "built $LIB ($(du -h "$LIB" | cut -f1))"

step "link check: every undefined symbol of _C is defined by a library it needs"
"$PYTHON" - "$LIB" "$TORCH_DIR/lib" "$TOOLKIT_ROOT/lib64" "$(dirname "$NVRTC")" <<'PY'
import re
import subprocess
import sys
from pathlib import Path

lib, *search = sys.argv[1:]
def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run("readelf", "-d", lib))
# ld-linux provides __tls_get_addr, which code reading torch's thread-local state (autograd) needs.
system = {"libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"}
provided: set[str] = set()
for name in needed:
    if name in system:
        path = run("gcc", f"-print-file-name={name}").strip()
    else:
        path = next((str(Path(d) / name) for d in search if (Path(d) / name).exists()), "")
    if not path or not Path(path).exists():
        sys.exit(f"build_cuda_ops.sh: _C needs {name}, found in none of {search}")
    for line in run("nm", "-D", "--defined-only", path).splitlines():
        provided.add(line.split()[-1].split("@")[0])
undefined = {line.split()[-1].split("@")[0] for line in run("nm", "-D", "--undefined-only", lib).splitlines()}
# Python API symbols come from the interpreter that imports the module; weak ones may stay unset.
weak = {line.split()[-1].split("@")[0] for line in run("nm", "-D", "--undefined-only", lib).splitlines()
        if line.split()[0] in ("w", "v")}
missing = sorted(s for s in undefined - provided - weak if not s.startswith(("Py", "_Py")))
print(f"needs {', '.join(needed)}")
if missing:
    sys.exit(f"build_cuda_ops.sh: {len(missing)} undefined symbols: {missing[:10]}")
print(f"all {len(undefined)} undefined symbols are provided")
if not any(n.startswith("libcudart") for n in needed) or "libc10_cuda.so" not in needed:
    sys.exit("build_cuda_ops.sh: _C does not link the CUDA runtime and c10_cuda: it is not a CUDA build")
PY

step "kernel check (cuobjdump)"
CUOBJDUMP="$(command -v cuobjdump || true)"
if [ -z "$CUOBJDUMP" ] && [ -x "$TOOLKIT_ROOT/bin/cuobjdump" ]; then
  CUOBJDUMP="$TOOLKIT_ROOT/bin/cuobjdump"
fi
[ -n "$CUOBJDUMP" ] || CUOBJDUMP="$(nvidia_file cuda-cuobjdump cuobjdump ">=${CUDA_VERSION%.*},<$((${CUDA_VERSION%.*} + 1))")" || exit 1
chmod +x "$CUOBJDUMP"
"$CUOBJDUMP" --version | tail -n 1
"$CUOBJDUMP" --dump-resource-usage "$LIB" > "$OUT/resource_usage.txt"
"$CUOBJDUMP" --list-elf "$LIB" > "$OUT/elf_list.txt"
"$PYTHON" - "$OUT/resource_usage.txt" "${ARCHS[*]}" "${KERNELS[*]}" <<'PY'
import re
import sys

text, archs, kernels = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
found: dict[str, list[tuple[str, str]]] = {arch: [] for arch in archs}
arch = None
function = None
for line in open(text):
    header = re.search(r"arch = (sm_\d+)", line)
    if header:
        arch = header.group(1)
        continue
    name = re.search(r"Function (\S+):", line)
    if name:
        function = name.group(1)
        continue
    if function and "REG:" in line and arch in found:
        found[arch].append((function, " ".join(line.split())))
        function = None
bad = []
for arch in archs:
    for kernel in kernels:
        rows = [usage for fn, usage in found[arch] if kernel in fn]
        if not rows:
            bad.append(f"{kernel} for {arch}")
        for usage in rows:
            print(f"{arch} {kernel}: {usage}")
if bad:
    sys.exit(f"build_cuda_ops.sh: the library lacks the CUDA kernels {', '.join(bad)}")
print(f"the library holds all {len(kernels)} hsft kernels for {', '.join(archs)}")
PY
echo "OK: $LIB"
