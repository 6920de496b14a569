"""The U-Net reference stage through its entry, on a few synthetic images: it trains until the validation
Dice stops improving, keeps the best epoch, and scores the report split in the evaluator's layout."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hsft.config import DataConfig, UNetStageConfig
from hsft.data import load_splits, make_fundus
from hsft.engine.tensorboard import TBWriter
from hsft.stages import unet
from hsft.stages.report import stage_notes


def _ctx(tmp_path, data: DataConfig):
    return SimpleNamespace(seed=0, device=torch.device("cpu"), splits=load_splits(data), cfg=SimpleNamespace(data=data),
                           stage_dir=lambda name: tmp_path / name, tb=lambda name: TBWriter(None))


def test_the_unet_trains_until_validation_stops_improving_and_scores_the_untouched_split(tmp_path):
    data = DataConfig(synthetic_train=16, synthetic_test=4, synthetic_untouched=6, synthetic_size=64, val_fraction=0.25)
    cfg = UNetStageConfig(base_channels=8, levels=3, res_units=1, max_epochs=30, patience=6)
    ctx = _ctx(tmp_path, data)
    torch.manual_seed(ctx.seed)
    untrained = unet.predict_dice(unet.build_unet(cfg), ctx.splits.untouched, 4, torch.device("cpu"))
    result = unet.run(ctx, cfg, None)
    metrics = json.loads((tmp_path / "unet" / "metrics.json").read_text())
    epochs = metrics["epochs"]
    kept = epochs[metrics["best_epoch"] - 1]["val_dice"]
    assert metrics["val_dice"] == kept and all(e["val_dice"] <= kept + cfg.min_improvement for e in epochs)
    # It stopped because `patience` epochs brought nothing better, or at the cap.
    assert len(epochs) == cfg.max_epochs or len(epochs) - metrics["best_epoch"] == cfg.patience
    evaluation = json.loads((tmp_path / "unet" / "eval.json").read_text())
    assert evaluation["split"] == "untouched" and evaluation["n"] == 6
    assert [r["id"] for r in evaluation["samples"]] == [f"synth_{1_500_000 + i:07d}" for i in range(6)]
    dice = [r["scores"]["generate"]["dice"] for r in evaluation["samples"]]
    assert result.summary["dice"] == pytest.approx(np.mean(dice)) and result.summary["dice"] > np.mean(untrained) + 0.1
    assert result.summary["parameters"] == unet.parameter_count(unet.build_unet(cfg))
    note = stage_notes("unet", result.summary)[0]
    assert "MONAI UNet" in note and f"kept epoch {metrics['best_epoch']}" in note
    assert (tmp_path / "unet" / "unet.safetensors").is_file()


def test_images_whose_side_is_no_multiple_of_the_stride_are_padded_and_cropped_back():
    cfg = UNetStageConfig(base_channels=4, levels=3, res_units=0)
    model = unet.build_unet(cfg)
    sample = make_fundus(1_500_003, 45)
    images, masks, fovs = unet._tensors([sample], 4, torch.device("cpu"))
    assert images.shape[-2:] == (48, 48) and masks[0, 0, 45:].sum() == 0 and fovs[0, 0, :, 45:].sum() == 0
    (dice,) = unet.predict_dice(model, [sample], 4, torch.device("cpu"))
    assert 0.0 <= dice <= 1.0


def test_the_loss_is_lower_for_the_right_mask_than_for_its_inverse():
    masks = (torch.rand(2, 1, 16, 16) > 0.7).float()
    fovs = torch.ones_like(masks)
    right = unet.dice_bce((masks * 2 - 1) * 8, masks, fovs)
    wrong = unet.dice_bce((1 - masks * 2) * 8, masks, fovs)
    assert right < 0.05 < 1.0 < wrong
