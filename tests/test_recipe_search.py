"""The validation-split search of the tiny recipe (hsft.recipe_search), on a tiny grid and tiny data."""

from __future__ import annotations

import json

import pytest

from hsft.config import replace_nested
from hsft.recipe_search import format_table, search_recipe
from hsft.recipes import recipe_config

from launch_scripts import ZERO2


def test_the_search_scores_every_point_on_the_validation_split_and_chains_the_best(tmp_path, monkeypatch):
    monkeypatch.setenv("HSFT_CACHE", str(tmp_path / "cache"))
    cfg = replace_nested(recipe_config("tiny"), deepspeed=str(ZERO2), **{
        "base.pool_size": 8, "base.encoder_pool_size": 8, "base.train.epochs": 1, "data.synthetic_train": 10,
        "data.synthetic_test": 2,
        "data.synthetic_size": 48, "data.val_fraction": 0.2, "lora.train.micro_batch": 4,
        "dpo.train.epochs": 1, "mining.max_new_tokens": 8})
    grid = {"lora": {"lora.train.lr": [1e-3, 1e-2]}, "dpo": {"dpo.train.lr": [1e-4]}}
    points = search_recipe(tmp_path / "tune", base=cfg, grid=grid, log=lambda *_: None)
    assert [(p.stage, p.values) for p in points] == [("lora", {"lora.train.lr": 1e-3}),
                                                     ("lora", {"lora.train.lr": 1e-2}),
                                                     ("dpo", {"dpo.train.lr": 1e-4})]
    default_precision = json.loads((tmp_path / "tune" / "base" / "report.json").read_text())["precision"]
    lora = [p for p in points if p.stage == "lora"]
    assert lora[0].start_val_dice == lora[1].start_val_dice
    for point in points:
        stage_dir = tmp_path / "tune" / point.stage / f"lr{point.values[f'{point.stage}.train.lr']}"
        metrics = json.loads((stage_dir / point.stage / "metrics.json").read_text())
        assert point.val_dice == metrics["epochs"][-1]["val_dice"]
        report = json.loads((stage_dir / "report.json").read_text())
        # The points train in the embedded default run's own precision (fp32 on a CPU, though they start
        # from --model), and only the stage searched.
        assert report["precision"] == default_precision and report["stages"] == [point.stage]
    best = max(lora, key=lambda p: p.val_dice)
    assert [p.chosen for p in points] == [p is best for p in lora] + [True]
    # DPO starts from the chosen LoRA model, scored as the LoRA point scored it.
    assert points[2].start_val_dice == best.val_dice
    assert json.loads((tmp_path / "tune" / "dpo" / "lr0.0001" / "run_config.json").read_text())["start_model"] \
        == best.model_dir
    table = format_table(points)
    assert table.count("\n") == 4 and "| lora | lr 0.01 |" in table


def test_an_unknown_stage_in_the_grid_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"grid: unknown stage\(s\) \['eval'\]"):
        search_recipe(tmp_path, grid={"eval": {}})
