"""Build checks of csrc: the C++ kernel tests through CMake + ctest, and the whole CUDA op library built
and linked against the CUDA build of torch by launch/build_cuda_ops.sh for sm_80 and sm_90 (CI has nvcc but
no GPU). The CUDA library is built once for every check that reads it; each build has its own temporary
directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_scripts import REPO


CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cpp_kernel_tests_pass_under_ctest(tmp_path: Path) -> None:
    # Only the plain-C++ kernels and their test: no torch, so this stays fast.
    configure = ["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                 "-DHSFT_BUILD_TORCH_OPS=OFF", "-DHSFT_BUILD_TESTS=ON"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(tmp_path), "--parallel", "2"],
                ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]):
        result = run(cmd, REPO)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory) -> tuple[Path, str]:
    """launch/build_cuda_ops.sh run once: (its output directory, its log). Step 0 compiles each .cu for sm_80
    and sm_90 into OUT.ptxas/ (one log per source); the rest builds and checks the library in OUT.
    The first run downloads the CUDA build of torch (~530 MB) into ~/.cache/hsft/wheels (or
    $HSFT_WHEEL_CACHE); later runs reuse it."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("cuda_build") / "cuda_ops"
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = out.parent / "build.log"
    with log.open("w") as handle:
        proc = subprocess.run(["bash", "launch/build_cuda_ops.sh", str(out)], cwd=REPO, env=env,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=3600)
    output = log.read_text()
    print(output)  # pytest -s shows it
    assert proc.returncode == 0, output[-4000:]
    return out, output


def test_build_cuda_ops_script_builds_links_and_holds_the_kernels(cuda_build) -> None:
    out, output = cuda_build
    assert "hsft: building the CUDA ops (torch CUDA" in output
    assert "undefined symbols are provided" in output
    assert "no spills in" in output
    assert "the library holds all 4 hsft kernels for sm_80, sm_90" in output
    assert list(out.glob("_C*.so"))


def test_cuda_sources_compile_for_sm80_and_sm90_without_warnings(cuda_build) -> None:
    """Every csrc/cuda/*.cu compiled for both architectures, and neither nvcc nor the host compiler had a
    warning for any of them (each source's nvcc log from the build's first step)."""
    out, _ = cuda_build
    assert CUDA_SOURCES, "no .cu files under csrc/cuda"
    ptxas = out.parent / f"{out.name}.ptxas"
    for source in CUDA_SOURCES:
        assert (ptxas / f"{source.stem}.o").stat().st_size > 0, source.name
        log = (ptxas / f"{source.stem}.log").read_text()
        for arch in ("sm_80", "sm_90"):
            assert re.search(rf"Compiling entry function '\S+' for '{arch}'", log), f"{source.name}: no {arch} code"
        warnings = [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]
        assert not warnings, f"{source.name}:\n" + "\n".join(warnings)
