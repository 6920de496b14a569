"""Running launch/ scripts in tests: a script's main() in-process (the scripts are files, not an importable
package), or the real script under the `deepspeed` launcher in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
ZERO2 = REPO / "ds_configs" / "zero2.json"


def launch_module(name: str):
    """launch/<name>.py as a module, loaded with launch/ on sys.path as `python launch/<name>.py` has it
    (for its `import _import_hsft`), and the path restored afterwards."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}_script", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.path.insert(0, str(LAUNCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def launch_main(name: str):
    """main(argv) of launch/<name>.py (see launch_module)."""
    return launch_module(name).main


def run_deepspeed(script: str, args: list[str], tmp: Path, *, ranks: int = 1, port: int, check: bool = True,
                  timeout: int = 1500) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS launch/<script>.py --deepspeed ds_configs/zero2.json ARGS` in `tmp`, with the
    stage-0 cache in `tmp/cache` and one thread per rank; fails with the output's tail unless `check` is off."""
    env = {**os.environ, "HSFT_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), str(LAUNCH / f"{script}.py"),
           "--deepspeed", str(ZERO2), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-6000:]}\nSTDERR\n{proc.stderr[-6000:]}")
    if proc.returncode == 0:  # no rank leaves DeepSpeed's CPU all-reduce buffer behind in /dev/shm
        leftover = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert not leftover, f"left in shared memory: {[p.name for p in leftover]}"
    return proc
