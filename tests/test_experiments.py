"""The experiment suites: what the paper suite holds, the statistics of a cell, the verdicts, and the real
entry point `deepspeed launch/experiments.py --suite smoke` end to end, resumed and refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from hsft.config import replace_nested
from hsft.eval.statistics import detectable_effect, effect_interval, paired_bootstrap
from hsft.experiments.results import _detectable, _paired, verdict
from hsft.experiments.suites import build_suite
from hsft.recipes import recipe_config

from launch_scripts import ZERO2, exit_status, run_deepspeed


def test_the_paper_suite_holds_every_table_of_the_study():
    suite, cfg = build_suite("paper", recipe_config("tiny"))
    tables = {t.key: t for t in suite.tables}
    assert set(tables) == {"4.4.1", "4.4.2", "4.4.3", "4.5.2", "4.5.3", "4.5.4", "5.1", "5.3", "5.3-tau"}
    assert [a.value for a in tables["4.5.2"].arms] == [0.60, 0.70, 0.75, 0.80]
    assert [a.value for a in tables["4.5.3"].arms] == [1, 3, 5, 7]
    # The tiny recipe's HSFT lr is a multiple of the published 1e-5: the grid is scaled by that ratio, and says so.
    scale = cfg.hsft.train.lr / 1e-5
    assert scale != 1 and [a.value for a in tables["4.5.4"].arms] == pytest.approx([s * scale for s in
                                                                                    (1e-6, 5e-6, 1e-5, 5e-5)])
    assert f"x {scale:g}" in tables["4.5.4"].title
    assert [a.name for a in tables["4.5.4"].arms if a.same_as] == [f"lr-{cfg.hsft.train.lr:.0e}"]
    assert {a.stage for a in tables["5.1"].arms if not a.same_as} == {"all_data", "curriculum", "anti_curriculum",
                                                                      "loss_weighted", "easy_control", "unet"}
    # Every subset row has its own random-subset control with the row's settings, run right after the row and
    # reading the row's hard set when the row mines its own; the prefix's HSFT rows use the prefix's control.
    subset_rows = [a for key in ("4.4.2", "4.5.2") for a in tables[key].arms] + [
        a for a in tables["5.3"].arms if a.name.startswith("quantile")]
    assert len(subset_rows) == 10 and all(a.control is not None for a in subset_rows)
    order = [a.name for a in suite.arms()]
    for row in subset_rows:
        if row.same_as == "hsft":
            assert row.control.same_as == "control"
            continue
        control = row.control
        assert control.stage == "control" and control.overrides == row.overrides and not control.remine
        assert control.mining_from == (row.name if row.remine else None)
        assert order.index(control.name) == order.index(row.name) + 1
    assert not any(a.control for a in tables["5.1"].arms + tables["4.5.3"].arms + tables["4.5.4"].arms)
    assert {a.same_as for a in tables["5.1"].arms if a.same_as} == {"hsft", "control"}
    # Rows whose settings are the prefix's reuse its HSFT; the others run, with settings a run accepts.
    assert [a.name for a in tables["4.5.2"].arms if a.same_as] == ["tau-0.75"]
    assert [a.name for a in tables["4.5.3"].arms if a.same_as] == ["epochs-5"]
    for arm in suite.arms():
        replace_nested(cfg, **dict(arm.overrides)).validate()
    assert all(a.remine for a in tables["4.5.2"].arms if not a.same_as)
    paper_suite, _ = build_suite("paper", recipe_config("paper"))
    assert [a.value for a in paper_suite.table("4.5.4").arms] == pytest.approx([1e-6, 5e-6, 1e-5, 5e-5])
    assert "the published grid" in paper_suite.table("4.5.4").title
    with pytest.raises(ValueError, match="--suite: unknown suite 'nope'"):
        build_suite("nope", cfg)


def test_a_cell_is_the_crossed_interval_over_seeds_and_images_and_lists_each_seed():
    cfg = recipe_config("tiny")
    rng = np.random.default_rng(0)
    before = {s: {f"img{i}": (float(rng.uniform()), 0.0) for i in range(20)} for s in (0, 1, 2)}
    after = {s: {k: (v[0] + 0.05 * (s + 1) + 0.01 * rng.normal(), 0.0) for k, v in rows.items()}
             for s, rows in before.items()}
    effect = _paired(before, after, cfg)
    ids = sorted(before[0])
    diffs = np.array([[after[s][i][0] - before[s][i][0] for i in ids] for s in (0, 1, 2)])
    expected = effect_interval(diffs)
    assert effect["mean"] == pytest.approx(diffs.mean()) and (effect["low"], effect["high"]) == pytest.approx(
        (expected["low"], expected["high"]))
    assert effect["method"].startswith("seeds x images crossed") and effect["seeds"] == 3 and effect["images"] == 20
    assert effect["per_seed"] == pytest.approx({str(s): diffs[s].mean() for s in (0, 1, 2)})
    # The seeds disagree (0.05, 0.10, 0.15): the interval is about as wide as that spread allows, far wider than
    # the pooled bootstrap of the 60 pairs as if independent.
    pooled = paired_bootstrap(np.zeros(diffs.size), diffs.ravel(), resamples=2000, seed=0)
    assert effect["high"] - effect["low"] > 5 * (pooled["high"] - pooled["low"])
    assert effect["detectable"] > 0
    # The power calculation for other designs: more seeds detect smaller effects, from the same components.
    table = _detectable([effect])
    assert table["median"] == pytest.approx(effect["detectable"])
    assert table["designs"]["10x256"] == pytest.approx(detectable_effect(effect["components"], 10, 256))
    assert table["designs"]["20x256"] < table["designs"]["10x256"] < table["designs"]["3x256"]
    assert "designs" not in _detectable([effect_interval(diffs[:1])])  # one seed: no seed variance to plan with
    part = _paired(before, after, cfg, images=["img3", "img7"])
    picked = diffs[:, [ids.index("img3"), ids.index("img7")]]
    assert part["images"] == 2 and part["mean"] == pytest.approx(picked.mean())
    with pytest.raises(ValueError, match="different held-out images"):
        _paired(before, {0: after[0], 1: {"other": (0.0, 0.0)}, 2: after[2]}, cfg)


def _row(name, low, high, dice=0.5, hsft=None):
    effect = {"mean": (low + high) / 2, "low": low, "high": high, "per_seed": {0: (low + high) / 2}, "detectable": 0.02}
    return {"name": name, "row": name, "dice": {"mean": dice, "sd": 0.0}, "delta_start": effect, "delta_hsft": hsft}


def test_the_verdict_says_which_way_each_interval_falls():
    body = {"kind": "arms", "rows": [_row("up", 0.01, 0.03, dice=0.6), _row("down", -0.03, -0.01),
                                     _row("flat", -0.01, 0.01, hsft={"low": -0.02, "high": -0.005})]}
    text = verdict(body)
    assert "rose with up and fell with down" in text and "Highest mean: up" in text
    assert "worse than HSFT: flat" in text and "Better than HSFT: none" in text
    # A change an interval cannot tell from 0 is stated with its detectable-effect bound, never as "no effect".
    flat = {**_row("lora", -0.01, 0.01), "delta_prev": _row("x", -0.01, 0.01)["delta_start"]}
    stages = verdict({"kind": "stages", "rows": [_row("start", 0, 0), flat]})
    assert ("no measurable change (+0.0000 [-0.0100, +0.0100]; a true effect, if any, is likely smaller than "
            "0.0200)") in stages


def _launch(args, tmp, check=True):
    # The smoke suite trains a stage 0 per seed: allow for a busy 2-core machine.
    return run_deepspeed("experiments", args, tmp, check=check, timeout=3000)


SMOKE_SEEDS = ("0", "1", "2")
SMOKE_RUNS = ("base", "prefix", "tau-0.70", "tau-0.70-control", "curriculum", "easy_control", "unet")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiments")
    out = tmp / "exp"
    proc = _launch(["--suite", "smoke", "--seeds", *SMOKE_SEEDS, "--output-dir", str(out)], tmp)
    return tmp, out, proc


def _effects(node, path=""):
    """Every difference in results.json: each dict holding an interval (mean, low, high)."""
    if isinstance(node, dict):
        if {"mean", "low", "high"} <= set(node) and "confidence" in node:
            yield path, node
        for key, value in node.items():
            yield from _effects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _effects(value, f"{path}/{i}")


@pytest.mark.slow
def test_the_smoke_suite_writes_every_table_with_its_statistics_and_plots(smoke):
    tmp, out, proc = smoke
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2] and set(results["tables"]) == {"4.4.1", "4.4.3", "4.5.2", "5.1", "5.3-tau"}
    for seed in SMOKE_SEEDS:
        for run in SMOKE_RUNS:
            assert (out / f"seed{seed}" / run / "report.json").is_file(), run
    # One console line per run, the runs' own output in their log.txt.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[experiments] (")]
    assert len(lines) == len(SMOKE_SEEDS) * len(SMOKE_RUNS) and "[lora] epoch" not in proc.stdout
    assert "[lora]" in (out / "seed1" / "prefix" / "log.txt").read_text()
    # Each seed trained its own stage 0 (its own cache entry) and drew its own validation split: the starting
    # model's Dice differs by seed.
    start_dice = {next(r["dice"] for r in json.loads((out / f"seed{s}" / "prefix" / "report.json").read_text())[
        "evaluation"] if r["stage"] == "start") for s in SMOKE_SEEDS}
    assert len(start_dice) == 3
    caches = {json.loads((out / f"seed{s}" / "base" / "report.json").read_text())["base"]["cache"] for s in SMOKE_SEEDS}
    assert len(caches) == 3
    assert [json.loads((out / f"seed{s}" / "prefix" / "run_config.json").read_text())["data"]["seed"]
            for s in SMOKE_SEEDS] == [0, 1, 2]
    # Every difference carries each seed's value and the method of its interval (seeds x images crossed).
    effects = list(_effects(results["tables"]))
    assert len(effects) > 20
    for path, effect in effects:
        assert set(effect["per_seed"]) == set(SMOKE_SEEDS) and effect["method"].startswith("seeds x images"), path
    # Final numbers come from the untouched split, and every table names it.
    assert results["split_name"] == "untouched" and results["held_out_images"] == 8
    assert all(body["split"].startswith("untouched test split (8 synthetic images") for body in
               results["tables"].values())
    # Every cell is the mean over seeds of what the runs' own evaluations measured.
    stages = {r["name"]: r for r in results["tables"]["4.4.1"]["rows"]}
    per_seed = [json.loads((out / f"seed{s}" / "prefix" / "report.json").read_text())["evaluation"]
                for s in SMOKE_SEEDS]
    hsft_dice = [next(r["dice"] for r in rows if r["stage"] == "hsft") for rows in per_seed]
    assert stages["hsft"]["dice"]["mean"] == pytest.approx(np.mean(hsft_dice))
    assert stages["hsft"]["dice"]["sd"] == pytest.approx(np.std(hsft_dice, ddof=1))
    assert stages["hsft"]["delta_prev"]["per_seed"]["1"] == pytest.approx(hsft_dice[1] - next(
        r["dice"] for r in per_seed[1] if r["stage"] == "dpo"))
    # The subset row against its own control, on every image and on the hard and easy ones.
    tau_row = next(r for r in results["tables"]["4.5.2"]["rows"] if r["name"] == "tau-0.70")
    vs = tau_row["vs_control"]
    assert vs["hard_images"] + vs["easy_images"] == 8 and vs["all"]["images"] == 8
    control_hard = json.loads((out / "seed0" / "tau-0.70-control" / "mining" / "hard_samples.json").read_text())
    assert control_hard == json.loads((out / "seed0" / "tau-0.70" / "mining" / "hard_samples.json").read_text())
    alternatives = {r["name"]: r for r in results["tables"]["5.1"]["rows"]}
    assert {"easy_control", "unet"} <= set(alternatives) and alternatives["unet"]["hard"] is None
    counts = results["tables"]["4.4.3"]["hsft"]["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 3 * results["held_out_images"]
    rows = (out / "per_sample_4.4.3.csv").read_text().splitlines()
    assert rows[0].startswith("model,seed,sample") and len(rows) == 1 + 2 * 3 * results["held_out_images"]
    picked = results["tables"]["5.3-tau"]["rows"][0]
    assert set(picked["picks"].values()) <= {"tau = 0.70", "tau = 0.75"}
    md = (out / "results.md").read_text()
    for key in results["tables"]:
        assert f"## {key}:" in md
    assert md.count("**Reading:**") == len(results["tables"])
    assert "checks the plumbing, not the method" in md and "{'" not in md and "stage 0: embedded default, trained " \
        "per seed" in md
    assert (out / "plots" / "4.5.2.png").stat().st_size > 1000 and (out / "plots" / "4.4.3.png").is_file()
    assert any((out / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_finished_suite_is_kept_an_unfinished_run_is_finished_and_other_settings_are_refused(smoke, capsys):
    tmp, out, _ = smoke
    first = json.loads((out / "results.json").read_text())
    (out / "seed1" / "curriculum" / "report.json").unlink()  # as if killed before its report
    again = _launch(["--suite", "smoke", "--seeds", *SMOKE_SEEDS, "--output-dir", str(out)], tmp)
    assert again.stdout.count("finished earlier, kept") == len(SMOKE_SEEDS) * len(SMOKE_RUNS) - 1
    assert "seed 1: easy-to-hard curriculum over all data: curriculum Dice" in again.stdout
    assert json.loads((out / "results.json").read_text())["tables"] == first["tables"]
    # Other settings are refused before any run (in-process: a traceback would fail the test).
    capsys.readouterr()
    common = ["--deepspeed", str(ZERO2), "--suite", "smoke", "--seeds", "0", "--output-dir", str(out)]
    assert exit_status("experiments", [*common, "--hsft-lr", "0.5"]) == 2
    assert f"experiments: error: --output-dir {out} holds a suite run with other settings" in capsys.readouterr().err
    assert exit_status("experiments", [*common, "--shared-stage0"]) == 2
    assert "holds a suite run with other" in capsys.readouterr().err


def test_the_runner_starts_from_a_given_model_and_shares_the_prefix(monkeypatch, tmp_path, tiny_model_dir):
    """With --model, no stage 0 runs: each seed's prefix starts from that model, every arm from the prefix's
    DPO model; arms with the prefix's mining settings get its hard set, the others mine again."""
    from hsft.experiments import runner

    calls = []

    def fake_pipeline(cfg):
        calls.append(cfg)
        out = Path(cfg.output_dir)
        for stage in cfg.stages:
            (out / stage).mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text("{}")

    monkeypatch.setattr(runner, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(runner, "measure_train_dice", lambda cfg, model, out_file: None)
    monkeypatch.setattr("hsft.experiments.results.collect", lambda *a, **k: {})
    monkeypatch.setattr("hsft.experiments.results.write_results", lambda *a, **k: None)
    cfg = replace_nested(recipe_config("paper"), start_model=str(tiny_model_dir))
    runner.run_suite(cfg, "paper", [3], tmp_path / "exp")
    prefix, arms = calls[0], calls[1:]
    assert prefix.stages == runner.PREFIX_STAGES and prefix.start_model == str(tiny_model_dir) and prefix.seed == 3
    assert prefix.data.seed == 3  # the validation split is drawn per seed
    assert prefix.lora.seg_rows is True  # a real checkpoint's default, fixed for every run of the suite
    assert len(arms) == len(build_suite("paper", cfg)[0].arms())
    dpo = str(tmp_path / "exp" / "seed3" / "prefix" / "dpo" / "model")
    assert all(a.start_model == dpo and a.seed == 3 and a.data.seed == 3 for a in arms)
    assert all(a.stages[-1] == "eval" for a in arms if Path(a.output_dir).name != "unet")
    assert {Path(a.output_dir).name: a.stages for a in arms}["unet"] == ("unet",)
    assert not any(a.eval.evaluate_start for a in arms)
    remined = {Path(a.output_dir).name for a in arms if a.stages[0] == "mining"}
    assert remined == {"tau-0.60", "tau-0.70", "tau-0.80", "quantile-0.25"}
    assert all((Path(a.output_dir) / "mining").is_dir() for a in arms)
    assert {Path(a.output_dir).name: a.stages[0] for a in arms}["curriculum"] == "curriculum"
    # Finished runs are kept: running the suite again starts nothing.
    calls.clear()
    runner.run_suite(cfg, "paper", [3], tmp_path / "exp")
    assert calls == []


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "0"], "--seeds: give one or more distinct seeds, got [0, 0]"),
    (["--reference", "nowhere.json"], "--reference nowhere.json: no such file"),
    (["--reference", "bad.json"], "--reference bad.json: expected"),
    (["--hsft-hard-fraction", "0"], "hsft.hard_fraction: must lie in (0, 1], got 0.0"),
])
def test_bad_input_to_the_experiments_command_is_one_line_before_any_run(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"4.4.1": {"hsft": "high"}}))
    code = exit_status("experiments", ["--deepspeed", str(ZERO2), "--suite", "smoke", "--output-dir",
                                       str(tmp_path / "exp"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("experiments: error: ") and message in err[0]
    assert not (tmp_path / "exp" / "base").exists()


def test_the_study_ships_each_stages_spread_over_stage0_seeds_and_a_run_shows_it(tmp_path):
    from hsft.experiments.results import stage_spread
    from hsft.stages.report import results_table, shipped_spread

    results = {"suite": "core", "seeds": [0, 1, 2], "split": "untouched test split (256 synthetic images)",
               "shared_stage0": False, "tables": {"4.4.1": {"kind": "stages", "rows": [
                   {"name": "start", "delta_prev": None},
                   {"name": "lora", "delta_prev": {"per_seed": {"0": 0.10, "1": 0.05, "2": 0.07}}}]}}}
    spread = stage_spread(results, machine="Some CPU", threads=2, date="2026-12-07")
    assert spread["stages"]["lora"]["min"] == 0.05 and spread["stages"]["lora"]["max"] == 0.10
    assert spread["machine"] == "Some CPU" and spread["seeds"] == [0, 1, 2]
    assert stage_spread({**results, "shared_stage0": True}, machine="x", threads=1, date="d") is None
    path = tmp_path / "spread.json"
    path.write_text(json.dumps(spread))
    effect = effect_interval(np.array([0.1, 0.12, 0.08]))
    row = {"stage": "lora", "dice": 0.6, "started_from": "start", "effect": effect, "delta_base": 0.1, "iou": 0.4,
           "forward_dice": 0.6, "seg_rate": 1.0, "n": 3}
    text = "\n".join(results_table([row], "development split (3 images)", shipped_spread(path)))
    assert "| [+0.0500, +0.1000] |" in text and "Some CPU, 2 threads, 2026-12-07" in text
    assert "not bit-reproducible across thread counts and CPUs" in text
    assert "images only; this pair of checkpoints" in text
    assert "Split: development split (3 images)." in text
    assert "over stage-0 seeds" not in "\n".join(results_table([row], "x", None))
    assert shipped_spread(tmp_path / "none.json") is None


def test_a_moved_suite_directory_continues_and_other_settings_are_still_refused(tmp_path):
    from hsft.experiments.runner import SuiteError, _check_same_suite

    def record(**changes):
        cfg = replace_nested(recipe_config("tiny"), **changes)
        return {"suite": "core", "shared_stage0": False,
                "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}

    (tmp_path / "suite.json").write_text(json.dumps(record(output_dir="/elsewhere/study", verbose=True)))
    _check_same_suite(tmp_path, record(output_dir=str(tmp_path)))
    with pytest.raises(SuiteError, match=r"other settings \(hsft\)"):
        _check_same_suite(tmp_path, record(output_dir=str(tmp_path), **{"hsft.train.lr": 0.5}))


def test_the_package_ships_the_spread_of_every_training_stage_of_the_default_run():
    from hsft.stages.report import shipped_spread

    spread = shipped_spread()
    assert spread is not None, "hsft/stages/default_spread.json is missing or unreadable"
    assert len(spread["seeds"]) >= 5 and spread["machine"] and spread["threads"] >= 1 and spread["date"]
    assert "untouched" in spread["split"]
    for stage in ("lora", "dpo", "hsft", "control"):
        entry = spread["stages"][stage]
        assert entry["min"] <= entry["max"] and len(entry["per_seed"]) == len(spread["seeds"])
