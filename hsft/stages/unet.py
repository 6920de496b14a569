"""The U-Net reference beside the VLM route: what a vessel-segmentation user would train instead.

A plain MONAI `UNet` (2-D, residual units, the vessel community's usual baseline), trained from scratch on
the run's training split with Dice + BCE inside the field of view, one epoch at a time until the validation
split's Dice has not improved by more than `min_improvement` for `patience` epochs; the best epoch's
weights are kept. It is then scored
on the split the evaluation stage reports on (hsft.data.splits.DataSplits.report_split) with the same
per-image Dice (hsft.eval.scoring.score_logits: logits > 0, inside the FOV), and writes that evaluation
itself (`<out>/unet/eval.json`, the evaluator's per-sample layout), since it is no VLM and has no [SEG]
path. Nothing here reads the VLM stages: it is a reference row, not a stage of the method.

Images are padded to a multiple of the U-Net's total stride and the padding cropped off the logits.
Every rank trains the same model (the stage is small; it is not data-parallel) and rank 0 writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hsft.config import UNetStageConfig
from hsft.data import Sample
from hsft.data.batches import chunks
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.files import write_json
from hsft.eval.scoring import score_logits
from hsft.stages.training import StageResult

NAME = "unet"


def build_unet(cfg: UNetStageConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    channels = tuple(cfg.base_channels * 2 ** i for i in range(cfg.levels))
    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=channels, strides=(2,) * (cfg.levels - 1),
                num_res_units=cfg.res_units)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(samples: list[Sample], multiple: int, device: torch.device):
    """(images (N,3,H',W') in [0,1], masks (N,1,H',W'), fovs (N,1,H',W')), zero-padded to a multiple of the
    total stride; samples of one batch share a size (the batch is split by size beforehand)."""
    h, w = samples[0].image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    masks = torch.from_numpy(np.stack([s.mask for s in samples])).float()[:, None]
    fovs = torch.from_numpy(np.stack([s.fov if s.fov is not None else np.ones_like(s.mask) for s in samples]))
    fovs = fovs.float()[:, None]
    pad = (0, pw, 0, ph)
    return (F.pad(images, pad).to(device), F.pad(masks, pad).to(device), F.pad(fovs, pad).to(device))


def _batches(samples: list[Sample], batch_size: int, order: list[int]) -> list[list[Sample]]:
    """Batches in `order`, each of one image size."""
    by_size: dict[tuple[int, int], list[Sample]] = {}
    for i in order:
        by_size.setdefault(samples[i].image.shape[:2], []).append(samples[i])
    return [chunk for group in by_size.values() for chunk in chunks(group, batch_size)]


def dice_bce(logits: torch.Tensor, masks: torch.Tensor, fovs: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE inside the field of view, per image then averaged (the HSFT loss's two terms)."""
    prob = torch.sigmoid(logits) * fovs
    target = masks * fovs
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = 1.0 - (2 * inter + 1.0) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none") * fovs
    bce = bce.sum(dim=(1, 2, 3)) / fovs.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (dice + bce).mean()


@torch.no_grad()
def predict_dice(model: torch.nn.Module, samples: list[Sample], multiple: int, device: torch.device) -> list[float]:
    """Each sample's Dice of (logits > 0) inside its FOV, at its own resolution."""
    model.eval()
    dice = []
    for sample in samples:
        images, _, _ = _tensors([sample], multiple, device)
        h, w = sample.image.shape[:2]
        logits = model(images)[0, 0, :h, :w]
        dice.append(score_logits(logits.float().cpu(), sample.mask, sample.fov).dice)
    return dice


def run(ctx: RunContext, cfg: UNetStageConfig, start: Path | None) -> StageResult:
    """Train the U-Net reference on the training split and score it on the report split; `start` is unused
    (the reference does not start from the VLM)."""
    del start
    torch.manual_seed(ctx.seed)
    device = ctx.device
    model = build_unet(cfg).to(device)
    multiple = 2 ** (cfg.levels - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    train, val = ctx.splits.train, ctx.splits.val
    rng = np.random.default_rng(ctx.seed)
    tb = ctx.tb(NAME)
    best, best_epoch, best_state, epochs, steps = -1.0, 0, None, [], 0
    started = time.time()
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        losses = []
        for batch in _batches(train, cfg.batch_size, rng.permutation(len(train)).tolist()):
            images, masks, fovs = _tensors(batch, multiple, device)
            if cfg.flip:  # the one augmentation: fundus vessels have no preferred left/right
                flip = torch.from_numpy(rng.random(len(batch)) < 0.5).to(device)[:, None, None, None]
                images, masks, fovs = (torch.where(flip, t.flip(-1), t) for t in (images, masks, fovs))
            loss = dice_bce(model(images), masks, fovs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
        val_dice = float(np.mean(predict_dice(model, val, multiple, device))) if val else None
        epochs.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice})
        tb.scalars({f"{NAME}/loss": epochs[-1]["loss"], **({f"{NAME}/val_dice": val_dice} if val else {})}, epoch)
        score = val_dice if val else -epochs[-1]["loss"]  # no validation split: the training loss decides
        if best_state is None or score > best + cfg.min_improvement:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    tb.close()
    model.load_state_dict(best_state)
    split_name, samples = ctx.splits.report_split()
    dice = predict_dice(model, samples, multiple, device)
    out = ctx.stage_dir(NAME)
    params = parameter_count(model)
    summary = {"parameters": params, "channels": [cfg.base_channels * 2 ** i for i in range(cfg.levels)],
               "epochs": len(epochs), "best_epoch": best_epoch, "optimizer_steps": steps,
               "val_dice": epochs[best_epoch - 1]["val_dice"], "dice": float(np.mean(dice)) if dice else None,
               "split": split_name, "n": len(samples), "seconds": time.time() - started, "res_units": cfg.res_units,
               "patience": cfg.patience, "train_samples": len(train)}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(out / "unet.safetensors"))
        write_json(out / "metrics.json", {**summary, "epochs": epochs})
        rows = [{"index": i, "id": s.id, "scores": {"generate": {"dice": d}, "forward": {"dice": d}}}
                for i, (s, d) in enumerate(zip(samples, dice))]
        (out / "eval.json").write_text(json.dumps({"n": len(samples), "split": split_name, "samples": rows}))
    distributed.barrier()
    return StageResult(summary=summary, written={"unet reference": str(out)})
