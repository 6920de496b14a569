"""`launch/data.py`: synth then check round trip, every problem listed, --help."""

import os
import subprocess
import sys

import pytest

from hsft.data.layouts import folder_split_of

from launch_scripts import REPO, exit_status


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "data.py"), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


@pytest.mark.slow
def test_synth_then_check_round_trip(tmp_path):
    out = tmp_path / "synth"
    result = _run("synth", "--out", str(out), "--n", "10", "--seed", "5", "--size", "64")
    assert result.returncode == 0, result.stderr
    stems = [f"synth_{seed:07d}" for seed in range(5, 15)]
    for sub in ("images", "masks", "fov"):
        assert sorted(p.stem for p in (out / sub).glob("*.png")) == stems
    n_test = sum(folder_split_of(stem) == "test" for stem in stems)

    result = _run("check", "--format", "synthetic", "--root", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"train: {10 - n_test} images" in result.stdout
    assert f"test: {n_test} images" in result.stdout
    assert "64x64" in result.stdout and "vessel fraction in FOV: mean 0." in result.stdout
    assert result.stdout.rstrip().endswith("OK")

    # Writing into a directory that already holds a set is refused.
    again = _run("synth", "--out", str(out), "--n", "2", "--seed", "0", "--size", "64")
    assert again.returncode == 2 and "already holds files" in again.stderr


@pytest.mark.slow
def test_check_lists_every_problem_and_fails(tmp_path):
    out = tmp_path / "synth"
    assert _run("synth", "--out", str(out), "--n", "10", "--seed", "5", "--size", "48", "--quiet").returncode == 0
    stems = [f"synth_{seed:07d}" for seed in range(5, 15)]
    assert {folder_split_of(stem) for stem in stems} == {"train", "test"}  # both splits populated
    corrupt = out / "images" / f"{stems[1]}.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    (out / "masks" / f"{stems[3]}.png").unlink()
    result = _run("check", "--format", "folder", "--root", str(out))
    assert result.returncode == 1
    assert "2 problem(s)" in result.stdout
    assert f"{corrupt}: unreadable or corrupt image" in result.stdout
    assert f"{out / 'images' / stems[3]}.png: image has no vessel mask" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED")


def test_bad_arguments_and_help(tmp_path, capsys):
    """In-process: main()'s status and what it printed."""
    def status(*args: str) -> tuple[int, str, str]:
        code = exit_status("data", list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, _, err = status("check", "--data-format", "drive", "--data-root", str(tmp_path / "missing"))
    assert code == 2 and str(tmp_path / "missing") in err
    code, _, err = status("check", "--format", "nonsense", "--root", str(tmp_path))
    assert code == 2 and "drive" in err  # argparse lists the choices
    code, out, _ = status("--help")
    assert code == 0 and "synth" in out and "check" in out
    code, out, _ = status("check", "--help")
    assert code == 0 and "every problem found" in " ".join(out.split())
