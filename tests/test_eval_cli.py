"""`launch/evaluate.py`: end to end on a saved checkpoint (with --compare), and its refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hsft.config import DataConfig
from hsft.eval import InputError
from hsft.eval.cli import load_eval_samples, resolve_model_dir

from launch_scripts import REPO, launch_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A pipeline-like stage directory: <run>/hsft/model holds the saved model."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_model_dir, run / "hsft" / "model")
    return run


@pytest.mark.slow
def test_evaluate_command_end_to_end_with_compare(run_dir, tmp_path):
    model_dir = run_dir / "hsft" / "model"
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(model_dir), "--output", str(out),
         "--data-synthetic-test", "3", "--data-synthetic-size", "64", "--batch-size", "3", "--overlays", "1",
         "--eval-fixed-overlays", "1", "--eval-bootstrap-resamples", "200", "--device", "cpu",
         # the stage directory resolves to its model/
         "--compare", str(run_dir / "hsft")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == 3 and summary["with_fov"] == 3
    assert set(summary["paths"]) == {"forward", "prompt", "generate"}
    for name in ("eval.md", "per_sample.csv", "comparison.md", "comparison.csv", "compare/eval.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert any((out / "tb").glob("events.out.tfevents.*"))
    # The same weights compared with themselves: every sample Stable, zero change.
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["n"] == 3 and {row["change"] for row in comparison["rows"]} == {"Stable"}
    assert comparison["delta"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert "| sample | before | after | delta | category |" in result.stdout
    assert "generate (greedy, KV cache)" in result.stdout


def test_evaluate_command_refuses_bad_input_naming_it(run_dir, tmp_path, capsys):
    evaluate_main = launch_main("evaluate")
    missing = tmp_path / "nowhere"
    assert evaluate_main(["--checkpoint", str(missing), "--output", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not an hsft model directory" in capsys.readouterr().err
    model_dir = str(run_dir / "hsft" / "model")
    assert evaluate_main(["--checkpoint", model_dir, "--compare", str(missing), "--output", str(tmp_path / "o")]) == 2
    assert f"--compare {missing}" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", model_dir, "--data-format", "drive", "--output", str(tmp_path / "o")]) == 2
    assert "data.root" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", model_dir, "--data-format", "drive", "--data-root", str(missing),
                          "--output", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # An earlier evaluation's output is not mixed with this one's unless --overwrite replaces it.
    used = tmp_path / "used"
    used.mkdir()
    (used / "eval.json").write_text("{}")
    assert evaluate_main(["--checkpoint", model_dir, "--output-dir", str(used), "--data-synthetic-test", "1"]) == 2
    assert f"--output-dir {used}: already holds output; pass --overwrite" in capsys.readouterr().err
    assert (used / "eval.json").read_text() == "{}"


def test_model_dir_resolution_and_sample_selection(run_dir, tmp_path):
    assert resolve_model_dir(run_dir / "hsft") == run_dir / "hsft" / "model"
    assert resolve_model_dir(run_dir / "hsft" / "model") == run_dir / "hsft" / "model"
    broken = tmp_path / "file"
    broken.write_text("x")
    with pytest.raises(InputError, match=str(broken)):
        resolve_model_dir(broken)
    data = DataConfig(synthetic_test=4, synthetic_size=64, synthetic_train=4)
    test = load_eval_samples(data, "test", limit=2)
    assert len(test) == 2 and [s.id for s in test] == [s.id for s in load_eval_samples(data, "test")[:2]]
    val = load_eval_samples(data, "val")
    assert val and not {s.id for s in val} & {s.id for s in load_eval_samples(data, "test")}
    with pytest.raises(InputError, match="--limit"):
        load_eval_samples(data, "test", limit=0)
