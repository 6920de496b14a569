"""One output directory, one writer: a live run's lock refuses a second run and names it; the lock of a
run killed with SIGKILL is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hsft.engine.output_lock import LOCK_FILE, OutputDirInUse, OutputDirLock

from launch_scripts import ZERO2, exit_status


def _holder(out: Path) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from hsft.engine.output_lock import OutputDirLock
        OutputDirLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_run_refuses_a_second_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner["pid"] == holder.pid
        with pytest.raises(OutputDirInUse, match=rf"--output-dir {out} is in use by another hsft run: process "
                                                 rf"{holder.pid} on "):
            OutputDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's file is still there; its lock is not.
    assert (out / LOCK_FILE).is_file()
    with OutputDirLock(out) as lock:
        assert lock.held and json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_the_same_process_cannot_hold_it_twice_and_release_frees_it(tmp_path):
    first = OutputDirLock(tmp_path)
    first.acquire()
    with pytest.raises(OutputDirInUse, match=f"process {os.getpid()}"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    OutputDirLock(tmp_path).acquire()


def test_main_command_refuses_an_output_dir_in_use(command_dir, capsys):
    out = command_dir / "run"
    holder = _holder(out)
    try:
        status = exit_status("hsft", ["--deepspeed", str(ZERO2), "--output-dir", str(out)])  # in-process
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("hsft: error:")]
    assert len(errors) == 1
    assert f"in use by another hsft run: process {holder.pid}" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the live run was touched
