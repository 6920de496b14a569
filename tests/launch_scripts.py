"""The repository's paths, and running launch/ scripts in tests: a script's main() in-process (the scripts
are files, not an importable package), or the real script under the `deepspeed` launcher in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def exit_status(name: str, argv: list[str]) -> int:
    """launch/<name>.py's exit status for `argv`, run in-process: what main() returns, or the status of the
    SystemExit its argument parser raises (2 for a bad option)."""
    try:
        return launch_main(name)(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def free_port() -> int:
    """A TCP port that nothing listens on now, for a launcher's rendezvous: tests that run at the same time
    (pytest -n) must not share one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(tmp: Path) -> dict:
    """The environment of a launched run in `tmp`: its own stage-0 cache, unbuffered output, one thread per rank."""
    return {**os.environ, "HSFT_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def deepspeed_command(script: Path, args: list[str], *, ranks: int = 1, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS` (a free port unless one is given)."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), str(script), *args]


def run_deepspeed(script: str, args: list[str], tmp: Path, *, ranks: int = 1, check: bool = True,
                  timeout: int = 1500) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS launch/<script>.py --deepspeed ds_configs/zero2.json ARGS` in `tmp` (see
    launcher_env), on a free port; fails with the output's tail unless `check` is off."""
    port = free_port()
    cmd = deepspeed_command(LAUNCH / f"{script}.py", ["--deepspeed", str(ZERO2), *args], ranks=ranks, port=port)
    proc = subprocess.run(cmd, cwd=tmp, env=launcher_env(tmp), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-6000:]}\nSTDERR\n{proc.stderr[-6000:]}")
    if proc.returncode == 0:  # no rank leaves DeepSpeed's CPU all-reduce buffer behind in /dev/shm
        leftover = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert not leftover, f"left in shared memory: {[p.name for p in leftover]}"
    return proc


def run_launched(cmd: list[str], tmp: Path, *, env: dict | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a launcher command in `tmp` (launcher_env unless `env` is given); fails with the output's tail."""
    proc = subprocess.run(cmd, cwd=tmp, env=env or launcher_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def kill_after_checkpoint(cmd: list[str], tmp: Path, ckpts: Path, tag: str = "epoch0001") -> None:
    """Start a launcher command and kill it with SIGKILL, the launcher and every rank as `kill -9 -PGID`
    would, a moment after checkpoint `tag` in `ckpts` is complete (a step or so into the next epoch)."""
    from hsft.engine import checkpoint

    proc = subprocess.Popen(cmd, cwd=tmp, env=launcher_env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 900
        while checkpoint.latest_tag(ckpts) != tag:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {tag} was complete"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Killed in the middle of the next epoch: nothing after the checkpoint is marked complete.
    assert checkpoint.latest_tag(ckpts) == tag
