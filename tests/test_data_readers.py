"""Dataset readers on fixtures written in the exact public layouts, and bad-input errors."""

import gzip
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsft.data import DatasetError, scan_dataset
from hsft.data.imageio import read_binary
from hsft.data.layouts import folder_split_of

HEIGHT, WIDTH = 36, 40  # deliberately not square: catches swapped axes


def _fixture_arrays(seed: int, height: int = HEIGHT, width: int = WIDTH):
    """A fundus-like image (bright red aperture on black, darker vessels), its mask and FOV."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    fov = ((ys - (height - 1) / 2) / (0.46 * height)) ** 2 + ((xs - (width - 1) / 2) / (0.46 * width)) ** 2 <= 1
    mask = fov & (rng.random((height, width)) < 0.15)
    image = np.zeros((height, width, 3), np.uint8)
    image[fov] = (200, 100, 40)
    image[mask] = (150, 40, 20)
    return image, mask, fov


def _save(array: np.ndarray, path: Path, *, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(array.astype(np.uint8) * 255 if mask else array)
    if path.name.endswith(".gz"):
        buffer = io.BytesIO()
        picture.save(buffer, format="PPM")
        path.write_bytes(gzip.compress(buffer.getvalue()))
    else:
        picture.save(path)


def _write_drive(root: Path) -> dict:
    truth = {}
    for word, numbers in (("training", (21, 22, 23)), ("test", (1, 2))):
        for number in numbers:
            image, mask, fov = _fixture_arrays(number)
            stem = f"{number:02d}_{word}"
            _save(image, root / word / "images" / f"{stem}.tif")
            _save(mask, root / word / "1st_manual" / f"{number:02d}_manual1.gif", mask=True)
            _save(fov, root / word / "mask" / f"{stem}_mask.gif", mask=True)
            truth[stem] = (image, mask, fov)
    # Part of the distribution, not of our ground truth: must be ignored.
    _save(_fixture_arrays(99)[1], root / "test" / "2nd_manual" / "01_manual2.gif", mask=True)
    (root / "training" / "images" / "Thumbs.db").write_bytes(b"\0")
    return truth


def _write_stare(root: Path) -> dict:
    truth = {}
    for key, gzipped in (("im0001", True), ("im0002", False), ("im0162", True)):
        image, mask, _ = _fixture_arrays(int(key[2:]))
        suffix = ".ppm.gz" if gzipped else ".ppm"
        _save(image, root / "stare-images" / f"{key}{suffix}")
        _save(mask, root / "labels-ah" / f"{key}.ah{suffix}", mask=True)
        truth[key] = (image, mask)
    # An unlabelled archive image and a second-observer label: both ignored.
    _save(_fixture_arrays(100)[0], root / "stare-images" / "im0100.ppm.gz")
    _save(_fixture_arrays(1)[1], root / "labels-vk" / "im0001.vk.ppm.gz", mask=True)
    return truth


def _write_chase(root: Path) -> dict:
    truth = {}
    for key in ("Image_01L", "Image_10R", "Image_11R"):
        image, mask, _ = _fixture_arrays(int(key[6:8]) * 2 + (key[-1] == "R"))
        _save(image, root / f"{key}.jpg")
        _save(mask, root / f"{key}_1stHO.png", mask=True)
        _save(~mask & mask, root / f"{key}_2ndHO.png", mask=True)
        truth[key] = (image, mask)
    return truth


def _write_hrf(root: Path) -> dict:
    truth = {}
    for key, suffix in (("01_dr", ".JPG"), ("02_h", ".jpg"), ("06_g", ".jpg"), ("15_dr", ".JPG")):
        image, mask, fov = _fixture_arrays(int(key[:2]) + len(key))
        _save(image, root / "images" / f"{key}{suffix}")
        _save(mask, root / "manual1" / f"{key}.tif", mask=True)
        # HRF FOV masks are RGB TIFFs.
        _save(np.repeat(fov[..., None].astype(np.uint8) * 255, 3, axis=2), root / "mask" / f"{key}_mask.tif")
        truth[key] = (image, mask, fov)
    return truth


def _ids(refs):
    return [ref.id for ref in refs]


def test_drive_layout(tmp_path):
    truth = _write_drive(tmp_path)
    train = scan_dataset("drive", tmp_path, split="train")
    test = scan_dataset("drive", tmp_path, split="test")
    assert _ids(train) == ["21_training", "22_training", "23_training"]
    assert _ids(test) == ["01_test", "02_test"]
    for ref in train + test:
        assert (ref.height, ref.width) == (HEIGHT, WIDTH)
        sample = ref.load()
        image, mask, fov = truth[ref.id]
        assert np.array_equal(sample.image, image)  # TIFF is lossless
        assert np.array_equal(sample.mask, mask)
        assert np.array_equal(sample.fov, fov)
        assert sample.source.endswith(f"{ref.id}.tif")


def test_stare_layout_gzipped_or_not(tmp_path):
    truth = _write_stare(tmp_path)
    train = scan_dataset("stare", tmp_path, split="train")
    test = scan_dataset("stare", tmp_path, split="test")
    assert _ids(train) == ["im0001", "im0002"]
    assert _ids(test) == ["im0162"]
    for ref in train + test:
        sample = ref.load()
        image, mask = truth[ref.id]
        assert np.array_equal(sample.image, image) and np.array_equal(sample.mask, mask)
        # No FOV ships with STARE: derived from the red channel, close to the true aperture.
        true_fov = image[..., 0] > 0
        iou = (sample.fov & true_fov).sum() / (sample.fov | true_fov).sum()
        assert iou > 0.85, iou


def test_chase_db1_layout(tmp_path):
    truth = _write_chase(tmp_path)
    assert _ids(scan_dataset("chase_db1", tmp_path, split="train")) == ["Image_01L", "Image_10R"]
    (ref,) = scan_dataset("chase_db1", tmp_path, split="test")
    assert ref.id == "Image_11R"
    sample = ref.load()
    image, mask = truth["Image_11R"]
    assert np.array_equal(sample.mask, mask)  # the 1st observer, not the (empty) 2nd
    assert np.abs(sample.image.astype(int) - image).mean() < 10  # JPEG: lossy
    assert sample.fov is not None and sample.fov.mean() > 0.5


def test_hrf_layout_with_any_case_jpg_and_rgb_fov(tmp_path):
    truth = _write_hrf(tmp_path)
    train = scan_dataset("hrf", tmp_path, split="train")
    test = scan_dataset("hrf", tmp_path, split="test")
    assert _ids(train) == ["01_dr", "02_h"]
    assert _ids(test) == ["06_g", "15_dr"]
    for ref in train + test:
        sample = ref.load()
        _, mask, fov = truth[ref.id]
        assert np.array_equal(sample.mask, mask) and np.array_equal(sample.fov, fov)


def test_folder_layout_flat_split_is_stable_by_stem(tmp_path):
    stems = [f"eye{i:02d}" for i in range(12)]
    for i, stem in enumerate(stems):
        image, mask, fov = _fixture_arrays(i)
        _save(image, tmp_path / "images" / f"{stem}.png")
        _save(mask, tmp_path / "masks" / f"{stem}.png", mask=True)
        _save(fov, tmp_path / "fov" / f"{stem}.png", mask=True)
    train = _ids(scan_dataset("folder", tmp_path, split="train"))
    test = _ids(scan_dataset("folder", tmp_path, split="test"))
    assert sorted(train + test) == stems and not set(train) & set(test)
    assert test == [stem for stem in stems if folder_split_of(stem) == "test"] and test
    # Adding images never moves an existing one between the splits.
    image, mask, _ = _fixture_arrays(50)
    _save(image, tmp_path / "images" / "late_arrival.png")
    _save(mask, tmp_path / "masks" / "late_arrival.png", mask=True)
    _save(mask | True, tmp_path / "fov" / "late_arrival.png", mask=True)
    assert set(test) <= set(_ids(scan_dataset("folder", tmp_path, split="test")))


def test_folder_layout_with_split_directories_and_no_fov(tmp_path):
    for split, stems in (("train", ("a", "b")), ("test", ("c",))):
        for stem in stems:
            image, mask, _ = _fixture_arrays(ord(stem))
            _save(image, tmp_path / split / "images" / f"{stem}.jpg")
            _save(mask, tmp_path / split / "masks" / f"{stem}.png", mask=True)
    assert _ids(scan_dataset("folder", tmp_path, split="train")) == ["a", "b"]
    (ref,) = scan_dataset("folder", tmp_path, split="test")
    assert ref.id == "c" and ref.load().fov is None


def test_synthetic_root_reads_like_folder(tmp_path):
    from hsft.data.export import write_synthetic_set

    write_synthetic_set(tmp_path, n=6, seed=10, size=48, progress=False)
    refs = scan_dataset("synthetic", tmp_path, split="train") + scan_dataset("synthetic", tmp_path, split="test")
    assert sorted(_ids(refs)) == [f"synth_{seed:07d}" for seed in range(10, 16)]
    from hsft.data import make_fundus

    loaded = {ref.id: ref.load() for ref in refs}
    fresh = make_fundus(12, 48)
    assert np.array_equal(loaded[fresh.id].image, fresh.image)
    assert np.array_equal(loaded[fresh.id].mask, fresh.mask)
    assert np.array_equal(loaded[fresh.id].fov, fresh.fov)


# --- mask binarisation rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,mode,values,expected",
    [
        ("eight_bit.png", "L", [0, 127, 128, 255], [False, False, True, True]),
        ("label_map.png", "L", [0, 1, 1, 0], [False, True, True, False]),  # 0/1 masks are label maps
        ("one_bit.png", "1", [0, 1, 0, 1], [False, True, False, True]),
        ("sixteen_bit.png", "I;16", [0, 30000, 40000, 65535], [False, False, True, True]),
        ("palette.gif", "P", [0, 200, 100, 255], [False, True, False, True]),
    ],
)
def test_mask_binarisation_rule(tmp_path, name, mode, values, expected):
    array = np.array([values], dtype=np.uint16 if mode == "I;16" else np.uint8)
    if mode == "1":
        picture = Image.fromarray(array.astype(bool))
    elif mode == "P":
        picture = Image.fromarray(array, mode="L").convert("P")
    else:
        picture = Image.fromarray(array)
    picture.save(tmp_path / name)
    assert read_binary(tmp_path / name).tolist() == [expected]


def test_rgb_mask_uses_brightest_channel(tmp_path):
    array = np.array([[[0, 0, 0], [255, 0, 0], [0, 0, 200], [100, 100, 100]]], np.uint8)
    Image.fromarray(array).save(tmp_path / "rgb.png")
    assert read_binary(tmp_path / "rgb.png").tolist() == [[False, True, True, False]]


# --- bad input: every error names the file and the problem -----------------------------------


def _raises(format, root, split, *patterns):
    with pytest.raises(DatasetError) as info:
        scan_dataset(format, root, split=split)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"
    return info.value


def test_corrupt_image_is_named(tmp_path):
    _write_drive(tmp_path)
    bad = tmp_path / "training" / "images" / "22_training.tif"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    _raises("drive", tmp_path, "train", re.escape(str(bad)), "corrupt")


def test_garbage_gzip_is_named(tmp_path):
    _write_stare(tmp_path)
    bad = tmp_path / "stare-images" / "im0001.ppm.gz"
    bad.write_bytes(b"not gzip at all")
    _raises("stare", tmp_path, "train", re.escape(str(bad)), "corrupt")


def test_size_mismatch_is_named(tmp_path):
    _write_drive(tmp_path)
    bad = tmp_path / "training" / "1st_manual" / "23_manual1.gif"
    _save(np.zeros((HEIGHT, WIDTH + 1), bool), bad, mask=True)
    _raises("drive", tmp_path, "train", re.escape(str(bad)), "does not match", f"{WIDTH + 1}x{HEIGHT}")


def test_fov_size_mismatch_is_named(tmp_path):
    _write_hrf(tmp_path)
    bad = tmp_path / "mask" / "06_g_mask.tif"
    _save(np.zeros((HEIGHT + 2, WIDTH), bool), bad, mask=True)
    _raises("hrf", tmp_path, "test", re.escape(str(bad)), "FOV mask size")


def test_mask_without_image_is_named(tmp_path):
    _write_drive(tmp_path)
    (tmp_path / "training" / "images" / "22_training.tif").unlink()
    orphan = tmp_path / "training" / "1st_manual" / "22_manual1.gif"
    _raises("drive", tmp_path, "train", re.escape(str(orphan)), "has no image")


def test_image_without_mask_is_named(tmp_path):
    _write_chase(tmp_path)
    (tmp_path / "Image_10R_1stHO.png").unlink()
    _raises("chase_db1", tmp_path, "train", re.escape(str(tmp_path / "Image_10R.jpg")), "no vessel mask",
            "Image_10R_1stHO.png")


def test_stare_labelled_image_missing_its_label(tmp_path):
    _write_stare(tmp_path)
    (tmp_path / "labels-ah" / "im0002.ah.ppm").unlink()
    _raises("stare", tmp_path, "train", re.escape(str(tmp_path / "stare-images" / "im0002.ppm")), "no vessel mask")


def test_empty_directory_is_named(tmp_path):
    for name in ("images", "1st_manual", "mask"):
        (tmp_path / "training" / name).mkdir(parents=True)
    _raises("drive", tmp_path, "train", re.escape(str(tmp_path / "training" / "images")), "empty directory")


def test_missing_layout_directory_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    _raises("folder", tmp_path, "train", re.escape(str(tmp_path / "masks")), "missing directory")


def test_unknown_format_lists_the_valid_ones(tmp_path):
    _raises("drivee", tmp_path, "train", "unknown dataset format 'drivee'", "drive, stare, chase_db1, hrf")


def test_missing_root_is_named(tmp_path):
    _raises("drive", tmp_path / "nowhere", "train", re.escape(str(tmp_path / "nowhere")), "does not exist")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_every_problem_is_reported_not_just_the_first(tmp_path):
    _write_drive(tmp_path)
    corrupt = tmp_path / "training" / "images" / "21_training.tif"
    corrupt.write_bytes(b"II*\0garbage")
    (tmp_path / "training" / "1st_manual" / "22_manual1.gif").unlink()
    stray = tmp_path / "training" / "images" / "holiday.png"
    _save(_fixture_arrays(0)[0], stray)
    error = _raises("drive", tmp_path, "train", re.escape(str(corrupt)), "22_training.tif", re.escape(str(stray)))
    assert len(error.problems) == 3
