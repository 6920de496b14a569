"""Build checks of csrc: the C++ kernel tests through CMake + ctest, an nvcc compile of the CUDA
sources for sm_80 and sm_90, and the whole CUDA op library built and linked against the CUDA build
of torch by launch/build_cuda_ops.sh (CI has nvcc but no GPU). Each builds in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path: Path) -> None:
    assert CUDA_SOURCES, "no .cu files under csrc/cuda"

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        return run(["nvcc", "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"), "-std=c++17",
                    f"-I{REPO / 'csrc'}", "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", "arch=compute_90,code=sm_90", "-Werror", "all-warnings"], REPO)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    for source, result in zip(CUDA_SOURCES, results):
        assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
        assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_build_cuda_ops_script_builds_links_and_holds_the_kernels(tmp_path: Path) -> None:
    # The first run downloads the CUDA build of torch (~530 MB) into ~/.cache/hsft/wheels (or
    # $HSFT_WHEEL_CACHE); later runs reuse it. The output is printed (pytest -s shows it live).
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "build.log"
    with log.open("w") as handle:
        proc = subprocess.run(["bash", "launch/build_cuda_ops.sh", str(tmp_path / "cuda_ops")], cwd=REPO, env=env,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=3600)
    output = log.read_text()
    print(output)
    assert proc.returncode == 0, output[-4000:]
    assert "hsft: building the CUDA ops (torch CUDA" in output
    assert "undefined symbols are provided" in output
    assert "no spills in" in output
    assert "the library holds all 4 hsft kernels for sm_80, sm_90" in output
    assert list((tmp_path / "cuda_ops").glob("_C*.so"))
