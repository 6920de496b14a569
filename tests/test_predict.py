"""Prediction on image files: every image mode, odd sizes, masks at the original size, clear refusals,
and `launch/predict.py` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsft.data import make_fundus
from hsft.eval import InputError, predict_images
from hsft.eval.predict import field_of_view, output_stems
from hsft.model import save_model
from hsft.model.chat import IGNORE_INDEX
from hsft.ops import upsample_masks

from forcing import ForceTokens
from launch_scripts import REPO, launch_main


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(model, directory)
    return directory


@pytest.fixture(scope="module")
def forcer(model) -> ForceTokens:
    tokens = model.tokenize(1, form="response")
    return ForceTokens(model.tokenize(1, form="generate").input_ids.shape[1],
                       tokens.input_ids[0][tokens.labels[0] != IGNORE_INDEX].tolist())


def write_mode_images(directory: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """One file per image mode, each of an odd size: mode -> (path, (height, width))."""
    rgb = make_fundus(11, 80).image[:71, :77]  # 71 x 77
    grey = rgb.mean(axis=2).astype(np.uint8)
    images = {
        "RGB": Image.fromarray(rgb),
        "L": Image.fromarray(grey[:65, :59]),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])[:53, :67]),
        "P": Image.fromarray(rgb[:49, :73]).convert("P", palette=Image.Palette.ADAPTIVE),
        "I;16": Image.fromarray((grey[:61, :45].astype(np.uint16) * 257)),
        "1": Image.fromarray(grey[:39, :41] > 100),
    }
    written = {}
    for mode, image in images.items():
        path = directory / f"img_{mode.replace(';', '')}.png"
        image.save(path)
        with Image.open(path) as reopened:
            # I;16 may reopen as "I" depending on the Pillow version; both are 16-bit grey.
            assert reopened.mode == mode or (mode == "I;16" and reopened.mode.startswith("I"))
        written[mode] = (path, (image.height, image.width))
    return written


def test_every_image_mode_gives_a_mask_of_the_original_size(model, forcer, tmp_path):
    files = write_mode_images(tmp_path)
    out = tmp_path / "out"
    predictions = predict_images(model, [path for path, _ in files.values()], out, batch_size=4,
                                 logits_processor=forcer, progress=False)
    assert len(predictions) == len(files)
    for prediction, (mode, (path, size)) in zip(predictions, files.items()):
        assert prediction.image == str(path) and prediction.seg_emitted and prediction.text == model.prompt.response
        with Image.open(prediction.mask) as mask:
            assert (mask.height, mask.width) == size and mask.mode == "L", mode
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        with Image.open(prediction.overlay) as overlay:
            assert (overlay.height, overlay.width) == size and overlay.mode == "RGB", mode
    recorded = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in recorded] == [str(p) for p, _ in files.values()]

    # The written mask is the generate path's logits upsampled to the file's size, thresholded at 0, inside
    # the photograph's field of view; the vessel fraction is over the field of view.
    rgb_path, size = files["RGB"]
    image = np.array(Image.open(rgb_path).convert("RGB"))
    logits = model.generate_seg(model.preprocess([image]), logits_processor=[forcer]).mask_logits
    fov = field_of_view(image)
    expected = upsample_masks(logits.float(), size, threshold=0.0)[0].numpy() & fov
    assert np.array_equal(np.asarray(Image.open(predictions[0].mask)) > 0, expected)
    assert predictions[0].vessel_fraction == pytest.approx(float(expected.sum() / fov.sum()))


def test_unreadable_images_are_refused_naming_each_file(model, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(make_fundus(0, 64).image).save(good)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text")
    missing = tmp_path / "missing.jpg"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError) as caught:
        predict_images(model, [good, not_an_image, missing, truncated, tmp_path], tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "4 of 5" in message
    for bad in (not_an_image, missing, truncated, tmp_path):
        assert str(bad) in message
    assert str(good) not in message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_output_names_do_not_collide(tmp_path):
    stems = output_stems([tmp_path / "a" / "img.png", tmp_path / "b" / "img.png", tmp_path / "im.ppm.gz"])
    assert stems == ["img", "img_2", "im"]


def test_launch_refuses_a_bad_checkpoint_naming_it(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(make_fundus(0, 64).image).save(image)
    predict_main = launch_main("predict")
    missing = tmp_path / "no_such_model"
    assert predict_main(["--checkpoint", str(missing), str(image), "--output-dir", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(tmp_path), str(image), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "hsft_model.json" in err


@pytest.mark.slow
def test_predict_command_end_to_end(checkpoint, tmp_path):
    first = tmp_path / "odd.png"
    Image.fromarray(make_fundus(3, 96).image[:83, :91]).save(first)
    second = tmp_path / "grey16.png"
    Image.fromarray(make_fundus(4, 64).image[:, :, 1].astype(np.uint16) * 257).save(second)
    out = tmp_path / "preds"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "predict.py"), "--checkpoint", str(checkpoint), str(first), str(second),
         "--out", str(out), "--device", "cpu"],  # --out: the old spelling of --output-dir
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for path, size in ((first, (83, 91)), (second, (64, 64))):
        line = next(line for line in result.stdout.splitlines() if line.startswith(str(path)))
        assert "[SEG] emitted:" in line and "text:" in line
        with Image.open(out / f"{path.stem}_mask.png") as mask:
            assert (mask.height, mask.width) == size
        assert (out / f"{path.stem}_overlay.png").is_file()


def _photo_with_a_black_frame(size: int = 96) -> np.ndarray:
    """A fundus-like photograph: a bright disc (the camera aperture) on a black frame."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    image = np.zeros((size, size, 3), np.uint8)
    image[disc] = (180, 90, 40)
    return image, disc


def test_prediction_marks_nothing_outside_the_field_of_view(model, tmp_path, monkeypatch):
    import torch

    from hsft.eval import predict as predict_module

    image, disc = _photo_with_a_black_frame()
    photo = tmp_path / "photo.png"
    Image.fromarray(image).save(photo)
    # A model that marks every pixel: what survives is exactly the field of view.
    monkeypatch.setattr(predict_module, "binary_mask", lambda logits, size: torch.ones(size, dtype=torch.bool))
    [inside] = predict_images(model, [photo], tmp_path / "fov", progress=False)
    mask = np.asarray(Image.open(inside.mask)) > 0
    yy, xx = np.mgrid[:96, :96]
    near_the_disc = (yy - 48) ** 2 + (xx - 48) ** 2 < (0.4 * 96 + 2) ** 2  # the reader smooths the rim by a pixel
    assert mask.any() and not (mask & ~near_the_disc).any()
    # The derived aperture is the disc up to its rim, and the fraction is over it.
    assert abs(int(mask.sum()) - int(disc.sum())) < 0.05 * disc.sum()
    assert inside.vessel_fraction == pytest.approx(1.0)
    assert inside.fov_fraction == pytest.approx(mask.mean())
    [whole] = predict_images(model, [photo], tmp_path / "whole", progress=False, fov=False)
    assert (np.asarray(Image.open(whole.mask)) > 0).all() and whole.fov_fraction == 1.0


def test_predict_says_what_the_model_is_and_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    from hsft.model.directory import write_training_record

    image = tmp_path / "x.png"
    Image.fromarray(make_fundus(0, 64).image).save(image)
    predict_main = launch_main("predict")
    stage = tmp_path / "run" / "hsft"
    import shutil

    shutil.copytree(checkpoint, stage / "model")
    write_training_record(stage / "model", recipe="tiny", precision="fp32", embedded_default=True, stage="hsft")
    out = tmp_path / "preds"
    # A stage directory stands for its model/.
    assert predict_main(["--model", str(stage), str(image), "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "stand-in trained on synthetic" in printed.splitlines()[0]
    assert predict_main(["--model", str(stage), str(image), "--output-dir", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert predict_main(["--model", str(stage), str(image), "--output-dir", str(out), "--device", "cpu",
                         "--overwrite"]) == 0
