"""InternVL's dynamic tiling (hsft.model.tiling) and an imported release's agreement with the release's
own predict_forward on non-square images, in generation, in the teacher-forced path and in training
micro-batches that mix tile counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsft.config import LoraStageConfig
from hsft.data import Sample
from hsft.model.checkpoint import load_model, save_model
from hsft.model.config import Conventions
from hsft.model.images import ImageBatch, ImagePreprocessor
from hsft.model.release import ReleaseError, export_sa2va, import_sa2va
from hsft.model.sa2va import causal_lm_loss
from hsft.model.tiling import TileSettings, candidate_grids, choose_grid, tile_count
from hsft.stages.batching import make_seg_batch, mask_loss_per_sample
from hsft.stages.lora import attach_lora
from hsft.stages.objective import FeatureCache

from forcing import ForceTokens
from release_checkpoints import ROPE_THETA, SIZES, write_release, write_sam2_config
import release_reference as ref

INSTRUCTION = "<image>Please segment the blood vessel."
RESPONSE = "Sure, [SEG]."


# ---------------------------------------------------------------- the grid choice

def _sizes_to_try() -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(8, 4000, size=(300, 2))]
    # exact grid ratios (ties between 1x1 / 2x2 / 3x3, 2x1 / 4x2 ...) at areas on both sides of the
    # area rule's thresholds, and the public fundus data sets' sizes
    for columns, rows in ((1, 1), (2, 1), (1, 2), (3, 2), (4, 3), (1, 3)):
        for scale in (10, 100, 200, 224, 225, 300, 316, 317, 448, 449, 700, 1000):
            sizes.append((columns * scale, rows * scale))
    sizes += [(565, 584), (700, 605), (999, 960), (3504, 2336), (1, 1), (1, 4000), (4000, 1)]
    return sizes


@pytest.mark.parametrize("min_tiles,max_tiles,tile", [(1, 12, 448), (1, 6, 448), (1, 12, 64), (1, 1, 448),
                                                      (3, 9, 448)])
def test_grid_choice_matches_internvls_scan(min_tiles, max_tiles, tile):
    settings = TileSettings(min_tiles, max_tiles, thumbnail=True)
    for width, height in _sizes_to_try():
        grid = choose_grid(width, height, tile, settings)
        assert (grid.columns, grid.rows) == ref.release_grid(width, height, min_tiles, max_tiles, tile), (width, height)
        assert min_tiles <= grid.tiles <= max_tiles


def test_equally_close_grids_go_to_the_larger_one_only_for_large_images():
    settings = TileSettings(1, 12, thumbnail=True)
    # square: 1x1, 2x2 and 3x3 are all exact; 2x2 needs an area above 2 tiles, 3x3 above 4.5
    assert choose_grid(448, 448, 448, settings).tiles == 1
    assert choose_grid(634, 634, 448, settings).tiles == 4  # 401956 > 401408 pixels
    assert choose_grid(633, 633, 448, settings).tiles == 1
    assert choose_grid(951, 951, 448, settings).tiles == 9
    # 2:1 -> 2x1, or 4x2 once the area exceeds 4 tiles
    assert (choose_grid(1000, 500, 448, settings).columns, choose_grid(1000, 500, 448, settings).rows) == (2, 1)
    assert (choose_grid(1400, 700, 448, settings).columns, choose_grid(1400, 700, 448, settings).rows) == (4, 2)
    # a tall image gets a tall grid
    tall = choose_grid(300, 900, 448, settings)
    assert (tall.columns, tall.rows) == (1, 3)


def test_tile_count_adds_the_thumbnail_only_to_several_tiles():
    with_thumb, without = TileSettings(1, 12, thumbnail=True), TileSettings(1, 12, thumbnail=False)
    assert tile_count(500, 500, 448, with_thumb) == 1 == tile_count(500, 500, 448, without)
    assert tile_count(1000, 500, 448, with_thumb) == 3 and tile_count(1000, 500, 448, without) == 2
    assert tile_count(3504, 2336, 448, with_thumb) == 7  # HRF: 3 x 2 + thumbnail


def test_candidate_grids_and_bad_settings():
    grids = candidate_grids(2, 4)
    assert {(g.columns, g.rows) for g in grids} == {(1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)}
    assert [g.tiles for g in grids] == sorted(g.tiles for g in grids)
    for bad in (dict(min_tiles=0), dict(max_tiles=0), dict(min_tiles=3, max_tiles=2), dict(min_tiles=True)):
        with pytest.raises(ValueError):
            TileSettings(**bad)
    with pytest.raises(ValueError, match="max_dynamic_patch"):
        Conventions.from_dict({"min_dynamic_patch": 4, "max_dynamic_patch": 2})


@pytest.mark.parametrize("thumbnail", [True, False])
def test_tiles_are_the_releases_preprocessing(thumbnail):
    """The preprocessor's tiles are the release's dynamic_preprocess + ToTensor + Normalize, exactly."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(60, 130, 3), dtype=np.uint8),   # 2 x 1
              rng.integers(0, 256, size=(50, 52, 3), dtype=np.uint8),    # 1 x 1
              rng.integers(0, 256, size=(200, 70, 3), dtype=np.uint8),   # 1 x 3
              rng.integers(0, 256, size=(70, 100, 3), dtype=np.uint8)]   # 3 x 2
    batch = ImagePreprocessor(64, 128, resize="pil_bicubic", tiling=TileSettings(1, 12, thumbnail))(images)
    want = [torch.stack([ref.to_normalised(tile) for tile in ref.release_tiles(Image.fromarray(image), 1, 12, 64,
                                                                                 thumbnail)])
            for image in images]
    assert batch.num_tiles == [len(w) for w in want] == ([3, 1, 4, 7] if thumbnail else [2, 1, 3, 6])
    torch.testing.assert_close(batch.vlm_pixels, torch.cat(want), rtol=0, atol=1e-6)
    assert batch.sam_pixels.shape == (4, 3, 128, 128) and len(batch) == 4
    picked = batch.select([3, 0])
    assert picked.num_tiles == [want[3].shape[0], want[0].shape[0]]
    torch.testing.assert_close(picked.vlm_pixels, torch.cat([want[3], want[0]]), rtol=0, atol=1e-6)
    assert picked.original_sizes == [(70, 100), (60, 130)]


def test_image_batch_refuses_tile_counts_that_do_not_add_up():
    with pytest.raises(ValueError, match="do not add up"):
        ImageBatch(torch.zeros(3, 3, 8, 8), torch.zeros(2, 3, 8, 8), [(8, 8), (8, 8)], [1, 1])
    with pytest.raises(ValueError, match="one of each per image"):
        ImageBatch(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), [(8, 8), (8, 8)], [2])


def test_hsft_models_keep_one_tile(tiny_model):
    assert tiny_model.conventions.tiling is None
    image = np.random.default_rng(4).integers(0, 256, size=(60, 300, 3), dtype=np.uint8)
    assert tiny_model.preprocess([image]).num_tiles == [1]


# ---------------------------------------------------------------- an imported release

@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("tiling")
    sam2 = write_sam2_config(root / "sam2.json")
    out = {}
    for family in ("qwen2", "internlm2"):
        src, tensors = write_release(root / f"src-{family}", family=family, dtype=torch.float32, tie=False)
        import_sa2va(src, root / family, sam2_config_file=sam2)
        out[family] = (root / family, tensors)
    return out


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((2 * (a & b).sum() + 1e-8) / (a.sum() + b.sum() + 1e-8))


def _answer_ids(model) -> list[int]:
    return model.tokenizer.encode(RESPONSE + "<|im_end|>", add_special_tokens=False)


IMAGES = ((60, 130), (52, 50), (70, 100))  # (H, W): 2 x 1 + thumbnail, one tile, 3 x 2 + thumbnail


@pytest.mark.parametrize("family", ["qwen2", "internlm2"])
def test_imported_model_predicts_what_the_releases_predict_forward_predicts(imported, family):
    directory, tensors = imported[family]
    model = load_model(str(directory), dtype="float32")
    model.prompt.instruction = INSTRUCTION
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in IMAGES]

    with torch.no_grad():
        batch = model.preprocess(images)
        answer = _answer_ids(model)
        prompt_length = model.tokenize(len(images), form="generate", tiles=batch.num_tiles).input_ids.shape[1]
        generated = model.generate_seg(batch, max_new_tokens=len(answer), logits_processor=[ForceTokens(prompt_length,
                                                                                                      answer)])
        forward = model.forward_seg(batch, model.tokenize(len(images), form="response", tiles=batch.num_tiles))
    assert bool(generated.seg_emitted.all())

    for row, image in enumerate(images):
        want = ref.predict_forward(image, INSTRUCTION, answer, tensors, model.tokenizer, family=family, sizes=SIZES,
                                   theta=ROPE_THETA, tiling=(1, 12, True), bos=family == "internlm2",
                                   sam_features=lambda pixels: model.sam2.vision_encoder(pixels).fpn_hidden_states)
        assert batch.num_tiles[row] == want.num_tiles
        assert 0 < int(want.mask.sum()) < want.mask.numel()  # a real mask, neither empty nor full
        for name, out in (("generate", generated), ("forward", forward)):
            cosine = torch.nn.functional.cosine_similarity(out.seg_embedding[row], want.prompt_embedding, dim=0)
            assert float(cosine) >= 0.999, (name, row, float(cosine))
            torch.testing.assert_close(out.seg_embedding[row], want.prompt_embedding, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.mask_logits[row], want.video_res, rtol=1e-4, atol=1e-3)
            height, width = image.shape[:2]
            mask = torch.nn.functional.interpolate(out.mask_logits[row][None, None], size=(height, width),
                                                   mode="bilinear", align_corners=False)[0, 0].sigmoid() > 0.5
            assert _dice(mask, want.mask) >= 0.99, (name, row)


def test_tokens_without_tile_counts_are_widened_to_the_images_tiles(imported):
    """Token batches built for one tile each (tokenize without tiles=) give what tokens built with the
    images' tile counts give; any other image-token count is refused."""
    model = load_model(str(imported["qwen2"][0]))
    rng = np.random.default_rng(6)
    batch = model.preprocess([rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in IMAGES])
    instructions = ["Segment it.", "Please segment the blood vessel in this image.", "Segment."]
    with torch.no_grad():
        want = model.forward_seg(batch, model.tokenize(3, instruction=instructions, tiles=batch.num_tiles),
                                 compute_lm_loss=True)
        got = model.forward_seg(batch, model.tokenize(3, instruction=instructions), compute_lm_loss=True)
    for name in ("mask_logits", "seg_hidden", "lm_logits", "lm_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"row 0: 32 image tokens, neither one tile's \(16\) nor its image's 3"):
        model.forward_seg(batch, model.tokenize(3, tiles=[2, 1, 1]))


def _samples(sizes) -> list[Sample]:
    rng = np.random.default_rng(7)
    samples = []
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.random((h, w)) < 0.3
        samples.append(Sample(f"s{i}", image, mask, None, f"test:{i}"))
    return samples


def _per_sample_losses(model, samples, form: str = "response") -> tuple[torch.Tensor, torch.Tensor]:
    batch = make_seg_batch(model, samples, form=form, dtype=torch.float32, device=torch.device("cpu"))
    out = model.forward_seg(batch.images, batch.tokens, compute_lm_loss=True)
    lm = torch.stack([causal_lm_loss(out.lm_logits[i:i + 1], batch.tokens.labels[i:i + 1])
                      for i in range(len(samples))])
    mask = mask_loss_per_sample(out.mask_logits, batch.masks, batch.fovs, bce_weight=0.5, eps=1e-8)
    return lm, mask


def test_training_micro_batches_mixing_tile_counts_equal_each_sample_alone(imported):
    """LoRA (CE + mask loss through the forward path) and HSFT (cached frozen features, mask loss):
    a micro-batch of a 3-tile and a 1-tile image gives each sample the loss it has alone."""
    model = load_model(str(imported["qwen2"][0]), dtype="float32")
    samples = _samples([(60, 130), (52, 50)])
    assert model.preprocess([s.image for s in samples]).num_tiles == [3, 1]

    attach_lora(model, LoraStageConfig(rank=4, dropout=0.0))
    with torch.no_grad():  # peft starts B at zero; give the adapters an effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    lm, mask = _per_sample_losses(model, samples)
    for i, sample in enumerate(samples):
        lm_alone, mask_alone = _per_sample_losses(model, [sample])
        torch.testing.assert_close(lm[i], lm_alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mask[i], mask_alone[0], rtol=1e-5, atol=1e-5)

    model.eval()
    together = FeatureCache(model, "prompt").batch(samples, torch.float32, torch.device("cpu"))
    losses = mask_loss_per_sample(model.decode_masks(together.sam_features, together.seg_hidden), together.masks,
                                  together.fovs, bce_weight=0.5, eps=1e-8)
    for i, sample in enumerate(samples):
        alone = FeatureCache(model, "prompt").batch([sample], torch.float32, torch.device("cpu"))
        loss = mask_loss_per_sample(model.decode_masks(alone.sam_features, alone.seg_hidden), alone.masks, alone.fovs,
                                    bce_weight=0.5, eps=1e-8)
        torch.testing.assert_close(losses[i], loss[0], rtol=1e-5, atol=1e-5)


def test_tiling_is_read_from_config_json_and_written_back(tmp_path):
    src, _ = write_release(tmp_path / "src", family="qwen2", dtype=torch.float32)
    config_path = src / "config.json"
    config = json.loads(config_path.read_text())
    config.update(min_dynamic_patch=2, max_dynamic_patch=6, use_thumbnail=False)
    config_path.write_text(json.dumps(config, indent=2))
    sam2 = write_sam2_config(tmp_path / "sam2.json")
    report = import_sa2va(src, tmp_path / "model", sam2_config_file=sam2)
    assert report.conventions["max_dynamic_patch"] == 6
    model = load_model(str(tmp_path / "model"))
    assert model.conventions.tiling == TileSettings(2, 6, False)
    # closest to 52:50 with at least 2 tiles: 2 x 2 (ratio 1), and no thumbnail
    assert model.preprocess([np.zeros((50, 52, 3), dtype=np.uint8)]).num_tiles == [4]

    # unchanged settings export the source's config.json byte for byte; changed ones are written back
    assert (export_sa2va(tmp_path / "model", tmp_path / "same") / "config.json").read_bytes() == config_path.read_bytes()
    model.conventions = Conventions.release(max_dynamic_patch=4, use_thumbnail=True)
    save_model(model, tmp_path / "changed")
    exported = json.loads((export_sa2va(tmp_path / "changed", tmp_path / "out") / "config.json").read_text())
    assert (exported["dynamic_image_size"], exported["min_dynamic_patch"], exported["max_dynamic_patch"],
            exported["use_thumbnail"]) == (True, 1, 4, True)
    assert {k: v for k, v in exported.items() if k not in Conventions.release().__dict__} == \
        {k: v for k, v in config.items() if k not in Conventions.release().__dict__}

    config.update(max_dynamic_patch=0)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ReleaseError, match="max_dynamic_patch must be a positive integer"):
        import_sa2va(src, tmp_path / "bad", sam2_config_file=sam2)
