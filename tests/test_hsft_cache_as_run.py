"""The frozen-feature cache as HSFT runs it: filled by the "before" loss probe (eval mode, chunks of 8
samples), then read by training micro-batches of another size, in bf16, on images with different tile
counts. HSFT's losses with the cache equal its losses without it (the features computed per micro-batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import DataSplits, Sample
from hsft.model.checkpoint import load_model
from hsft.model.release import import_sa2va
from hsft.stages.hsft import fine_tune
from hsft.stages.selection import whole_set

from release_checkpoints import write_release, write_sam2_config


# (H, W): 2 x 1 tiles + thumbnail, one tile, 3 x 2 + thumbnail (the release's dynamic tiling)
SIZES = ((60, 130), (52, 50), (70, 100), (52, 50), (60, 130))


@pytest.fixture(scope="module")
def bf16_release_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_as_run")
    src, _ = write_release(root / "src", family="qwen2", dtype=torch.bfloat16, tie=False)
    import_sa2va(src, root / "model", sam2_config_file=write_sam2_config(root / "sam2.json"))
    return root / "model"


def _samples() -> list[Sample]:
    rng = np.random.default_rng(11)
    return [Sample(f"s{i}", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), rng.random((h, w)) < 0.3, None,
                   f"test:{i}") for i, (h, w) in enumerate(SIZES)]


def _fine_tune(model_dir, make_context, tmp_path, cache: bool) -> dict:
    samples = _samples()
    ctx = make_context(splits=DataSplits(train=samples, val=[], test=[]), precision="bf16",
                       output_dir=str(tmp_path / ("cached" if cache else "uncached")))
    cfg = HSFTStageConfig(train=TrainConfig(epochs=2, micro_batch=2, grad_accum=1, lr=1e-3, min_lr=1e-5),
                          cache_features=cache)
    torch.manual_seed(0)
    result = fine_tune(ctx, cfg, model_dir, name="hsft", title="HSFT", plan=whole_set(samples, "all"), hard=samples)
    return {**result.summary, **json.loads((ctx.stage_dir("hsft") / "metrics.json").read_text())}


def test_hsft_with_the_cache_filled_by_its_probe_gives_the_uncached_losses_in_bf16(bf16_release_model, make_context,
                                                                                   tmp_path):
    model = load_model(str(bf16_release_model), dtype="bfloat16")
    assert sorted(set(model.preprocess([s.image for s in _samples()]).num_tiles)) == [1, 3, 7]
    cached = _fine_tune(bf16_release_model, make_context, tmp_path, cache=True)
    uncached = _fine_tune(bf16_release_model, make_context, tmp_path, cache=False)
    assert cached["cache"] and not uncached["cache"] and len(cached["losses"]) == len(uncached["losses"]) > 4
    # Bit for bit: the frozen features do not depend on the batch they were computed in.
    assert cached["hard_set_loss_before"] == uncached["hard_set_loss_before"]
    assert cached["losses"] == uncached["losses"]
    assert cached["hard_set_loss_after"] == uncached["hard_set_loss_after"]
