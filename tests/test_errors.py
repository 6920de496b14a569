"""How every command ends: one line and exit 2 for input the user can fix, the traceback for a bug, and
one line saying how to continue on an interrupt (SIGINT or SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from hsft.data import DatasetError
from hsft.engine.ds_config import DeepSpeedConfigError
from hsft.engine.loop import NonFiniteTrainingError
from hsft.engine.output_lock import OutputDirInUse
from hsft.errors import BadValue, MissingFile, UserError, run_command
from hsft.eval.errors import InputError
from hsft.model.release import ReleaseError
from hsft.pipeline import PipelineError


@pytest.mark.parametrize("error", [BadValue, MissingFile, DatasetError, DeepSpeedConfigError, OutputDirInUse,
                                   InputError, ReleaseError, PipelineError])
def test_input_errors_end_in_one_line_and_exit_2(error, capsys, monkeypatch):
    monkeypatch.delenv("HSFT_DEBUG", raising=False)

    def fail():
        raise error("--thing x: what is wrong")

    assert run_command("prog", fail) == 2
    assert capsys.readouterr().err == "prog: error: --thing x: what is wrong\n"


def test_a_bug_keeps_its_traceback_even_as_a_value_error():
    def bug():
        raise ValueError("inside torch")

    assert not issubclass(ValueError, UserError)
    with pytest.raises(ValueError, match="inside torch"):
        run_command("prog", bug)


def test_a_run_that_stopped_itself_exits_3(capsys):
    def stop():
        raise NonFiniteTrainingError("stage hsft: 3 non-finite steps")

    assert run_command("prog", stop) == 3
    assert "prog: stopped: stage hsft" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_says_how_to_continue(signum):
    # In a process of its own: a signal's Python handler runs in the main thread, and a test runner may run
    # tests in another thread (pytest-xdist's workers), where the interrupted command would wait forever.
    script = textwrap.dedent(f"""
        import os, signal, sys
        from hsft.errors import run_command

        # As in a command started in the foreground: a background job (a CI script's `&`) inherits SIGINT
        # ignored, and an ignored Ctrl-C is the shell's convention, not the command's to override.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = signal.getsignal(signal.SIGTERM)

        def interrupted():
            os.kill(os.getpid(), {int(signum)})
            signal.pause()  # the handler raises before this returns

        code = run_command("prog", interrupted, resume_hint="run the same command with --resume")
        assert signal.getsignal(signal.SIGTERM) is before, "the command's handler outlived it"
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == ["prog: interrupted; run the same command with --resume"]
