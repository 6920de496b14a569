"""Aggregating several runs' reports."""

import json
from pathlib import Path

import pytest

from hsft.eval.runs import RunsError, summarize_groups

from launch_scripts import exit_status


def fake_run(path: Path, seed: int, start: float, end: float) -> Path:
    path.mkdir(parents=True)
    rows = [{"stage": "base", "dice": start, "iou": start / 2}, {"stage": "hsft", "dice": end, "iou": end / 2}]
    (path / "report.json").write_text(json.dumps({"seed": seed, "evaluation": rows}))
    return path


def test_groups_average_the_change_over_runs(tmp_path):
    a = [fake_run(tmp_path / f"a{s}", s, 0.7, 0.7 + 0.01 * (s + 1)) for s in range(3)]
    b = [fake_run(tmp_path / f"b{s}", s, 0.7, 0.7) for s in range(2)]
    rows = summarize_groups({"hsft": a, "control": b})
    assert rows[0]["runs"] == 3 and rows[0]["delta"] == pytest.approx(0.02)
    assert rows[0]["delta_std"] == pytest.approx(0.01)
    assert rows[1]["delta"] == pytest.approx(0.0) and rows[1]["seeds"] == [0, 1]


def test_a_run_ends_at_its_main_line_or_at_the_named_stage(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"stage": "dpo", "dice": 0.7, "iou": 0.5}, {"stage": "hsft", "dice": 0.72, "iou": 0.5},
            {"stage": "control", "dice": 0.69, "iou": 0.5, "beside": "hsft"}]
    (run / "report.json").write_text(json.dumps({"seed": 1, "evaluation": rows}))
    hsft, control = summarize_groups({"hsft": [run], "control": [f"{run}:control"]})
    assert hsft["delta"] == pytest.approx(0.02) and control["delta"] == pytest.approx(-0.01)
    with pytest.raises(RunsError, match="no stage 'lora'"):
        summarize_groups({"x": [f"{run}:lora"]})


def test_missing_report_is_named(tmp_path, capsys):
    with pytest.raises(RunsError, match="nowhere: no report.json"):
        summarize_groups({"x": [str(tmp_path / "nowhere")]})
    assert exit_status("compare_runs", [f"x={tmp_path / 'nowhere'}"]) == 2
    assert "no report.json" in capsys.readouterr().err
