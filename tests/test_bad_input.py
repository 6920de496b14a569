"""The bad-input sweep: one test per case. Every broken input ends in one line naming the file or option
and what is wrong with it, found while the data, model and configs are read (before any training);
inputs that are merely unusual (16-bit, palette, {0,1}, {0,255} and soft masks, non-ASCII names) are
read correctly. The last tests run the main command itself and check its exit line."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsft.data import DataConfig, DatasetError, load_splits
from hsft.data.imageio import MAX_IMAGE_PIXELS, read_binary, read_rgb

from launch_scripts import ZERO2, exit_status


HEIGHT, WIDTH = 20, 24


def _sample_arrays(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = rng.random((HEIGHT, WIDTH)) < 0.2
    fov = np.ones((HEIGHT, WIDTH), bool)
    fov[0, :] = False
    return image, mask, fov


def _dataset(root: Path, train=("a", "b", "c"), test=("t",)) -> Path:
    """A folder-layout dataset (train/ and test/, each with images/, masks/ and fov/) of PNGs."""
    for split, stems in (("train", train), ("test", test)):
        for i, stem in enumerate(stems):
            image, mask, fov = _sample_arrays(hash((split, i)) % 1000)
            for sub, array in (("images", image), ("masks", mask.astype(np.uint8) * 255),
                               ("fov", fov.astype(np.uint8) * 255)):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / sub / f"{stem}.png")
    return root


def _load(root: Path):
    return load_splits(DataConfig(format="folder", root=str(root), val_fraction=0.0))


def _one_line_error(root: Path, path_or_option, *patterns: str) -> str:
    with pytest.raises(DatasetError) as info:
        _load(root)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path_or_option) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    return message


def _encoded(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# --- images and masks that cannot be decoded -----------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("GIF", ".gif")])
def test_truncated_image(tmp_path, fmt, suffix):
    root = _dataset(tmp_path)
    (root / "train" / "images" / "b.png").unlink()
    bad = root / "train" / "images" / f"b{suffix}"
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    if fmt == "GIF":
        image = np.asarray(Image.fromarray(image).convert("P"))
    data = _encoded(image, fmt)
    bad.write_bytes(data[: len(data) // 2])
    # The mask and FOV must match the (claimed) size for the decode error to be the only problem.
    for sub in ("masks", "fov"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "train" / sub / "b.png")
    _one_line_error(root, bad, "corrupt|truncated|not an image")


def test_zero_byte_file(tmp_path):
    root = _dataset(tmp_path)
    bad = root / "train" / "masks" / "a.png"
    bad.write_bytes(b"")
    _one_line_error(root, bad, r"empty file \(0 bytes\)")


def test_non_image_file_with_an_image_name(tmp_path):
    root = _dataset(tmp_path)
    bad = root / "train" / "images" / "c.png"
    bad.write_text("these are my notes, not a picture\n")
    _one_line_error(root, bad, "not an image")


def test_non_image_files_among_the_images_are_ignored(tmp_path):
    root = _dataset(tmp_path)
    (root / "train" / "images" / "notes.txt").write_text("not an image")
    (root / "train" / "images" / ".DS_Store").write_bytes(b"\0\1")
    splits = _load(root)
    assert sorted(s.id for s in splits.train) == ["a", "b", "c"]


def test_unreadable_file(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    bad = root / "train" / "images" / "a.png"
    bad.chmod(0)
    if os.geteuid() == 0:
        # root reads any file whatever its mode: make the open fail as it would for a user.
        real_open = Image.open

        def denied(path, *args, **kwargs):
            if Path(path) == bad:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("hsft.data.imageio.Image.open", denied)
    try:
        _one_line_error(root, bad, "permission denied")
    finally:
        bad.chmod(0o644)


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid-looking PNG whose header claims width x height: a decompression bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12000, 60000])  # above hsft's limit only, and above Pillow's too
def test_oversized_image_is_refused_before_decoding(tmp_path, side):
    root = _dataset(tmp_path)
    bad = root / "train" / "masks" / "b.png"
    bad.write_bytes(_png_claiming(side, side))
    assert bad.stat().st_size < 200
    _one_line_error(root, bad, "decompression-bomb guard", str(MAX_IMAGE_PIXELS))


# --- masks: every encoding of a binary mask reads the same -----------------------------------------


@pytest.mark.parametrize("encoding", ["0_1", "0_255", "16bit_0_65535", "16bit_0_255", "palette_dark"])
def test_binary_mask_encodings(tmp_path, encoding):
    truth = _sample_arrays(3)[1]
    path = tmp_path / "mask.png"
    if encoding == "0_1":
        Image.fromarray(truth.astype(np.uint8)).save(path)
    elif encoding == "0_255":
        Image.fromarray(truth.astype(np.uint8) * 255).save(path)
    elif encoding == "16bit_0_65535":
        Image.fromarray(truth.astype(np.uint16) * 65535).save(path)
    elif encoding == "16bit_0_255":  # 8-bit values in a 16-bit file: a fixed 16-bit threshold reads nothing
        Image.fromarray(truth.astype(np.uint16) * 255).save(path)
    else:  # palette mask whose foreground colour is dark blue
        picture = Image.fromarray(truth.astype(np.uint8), mode="L").convert("P")
        picture.putpalette([0, 0, 0, 0, 0, 90] + [0] * (254 * 3))
        picture.save(path)
        assert Image.open(path).mode == "P"
    if encoding.startswith("16bit"):
        assert Image.open(path).mode.startswith("I")
    assert np.array_equal(read_binary(path), truth)


def test_soft_mask_is_thresholded_at_half_scale(tmp_path):
    soft = np.array([[0, 40, 127, 128, 200, 255]], np.uint8)
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert read_binary(tmp_path / "soft.png").tolist() == [[False, False, False, True, True, True]]
    probability = np.array([[0.0, 0.2, 0.5, 0.51, 0.9, 1.0]], np.float32)
    Image.fromarray(probability, mode="F").save(tmp_path / "soft.tif")
    assert read_binary(tmp_path / "soft.tif").tolist() == [[False, False, False, True, True, True]]


def test_mask_with_nan_values(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan]], np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DatasetError, match=r"nan\.tif: mask holds non-finite values"):
        read_binary(tmp_path / "nan.tif")


def test_mask_size_differs_from_its_image(tmp_path):
    root = _dataset(tmp_path)
    bad = root / "train" / "masks" / "b.png"
    Image.fromarray(np.zeros((HEIGHT + 3, WIDTH), np.uint8)).save(bad)
    _one_line_error(root, bad, f"size {WIDTH}x{HEIGHT + 3} does not match its image")


def test_missing_fov_mask(tmp_path):
    root = _dataset(tmp_path)
    (root / "train" / "fov" / "c.png").unlink()
    _one_line_error(root, root / "train" / "images" / "c.png", "FOV")


def test_non_ascii_file_names(tmp_path):
    root = _dataset(tmp_path, train=("auge_grün", "眼底_1", "ojo-ñ"), test=("œil",))
    splits = _load(root)
    assert sorted(s.id for s in splits.train) == sorted(["auge_grün", "眼底_1", "ojo-ñ"])
    assert splits.test[0].id == "œil"
    bad = root / "train" / "images" / "眼底_1.png"
    bad.write_bytes(b"")
    _one_line_error(root, bad, "empty file")


def test_split_left_empty_after_filtering(tmp_path):
    root = _dataset(tmp_path, train=(), test=("t",))
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "train" / "images" / "readme.txt").write_text("no images here")
    _one_line_error(root, root / "train" / "images", "empty directory")


def test_read_rgb_of_a_truncated_gzip(tmp_path):
    import gzip

    bad = tmp_path / "im.ppm.gz"
    bad.write_bytes(gzip.compress(_encoded(_sample_arrays(0)[0], "PPM"))[:30])
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        read_rgb(bad)


# --- the main command: one line on stderr, exit 2, no traceback, nothing trained ------------------
# main() runs in-process (an exception escaping it fails the test with its traceback); test_main_command.py
# runs the real script once to show that the status and the line reach the shell.


@pytest.fixture
def main_command(command_dir, capsys):
    """main_command(*args) -> the one "hsft: error:" line of launch/hsft.py, run in-process and writing under
    tmp_path/run; asserts the exit status 2, that there is exactly one such line and that no stage started."""

    def run(*args: str) -> str:
        config = [] if "--deepspeed" in args else ["--deepspeed", str(ZERO2)]
        status = exit_status("hsft", [*config, "--output-dir", str(command_dir / "run"), *args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("hsft: error:")]
        assert status == 2 and len(lines) == 1, err[-3000:]
        assert not (command_dir / "run" / "base").exists()
        return lines[0]

    return run


def _assert_names(line: str, *needles: str) -> None:
    for needle in needles:
        assert needle in line, line


def test_main_command_names_a_truncated_image(tmp_path, main_command):
    root = _dataset(tmp_path / "data")
    bad = root / "test" / "images" / "t.png"
    bad.write_bytes(bad.read_bytes()[:200])
    _assert_names(main_command("--data-format", "folder", "--data-root", str(root)), str(bad), "corrupt")


def test_main_command_names_a_deepspeed_value_of_the_wrong_type(tmp_path, main_command):
    config = json.loads(ZERO2.read_text())
    config["zero_optimization"]["overlap_comm"] = "yes please"
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(config))
    _assert_names(main_command("--deepspeed", str(bad)), str(bad), "zero_optimization.overlap_comm")
    config = json.loads(ZERO2.read_text())
    config["bf16"]["enabled"] = "true"
    bad.write_text(json.dumps(config))
    _assert_names(main_command("--deepspeed", str(bad)), str(bad), "bf16.enabled")


def test_main_command_names_a_missing_model_file(tmp_path, tiny_model_dir, main_command):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "text_hidden_fcs.safetensors").unlink()
    line = main_command("--model", str(broken), "--stages", "lora", "--data-synthetic-train", "4")
    _assert_names(line, str(broken), "text_hidden_fcs.safetensors is missing")


def test_main_command_names_a_tensor_of_the_wrong_shape(tmp_path, tiny_model_dir, main_command):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights_file = broken / "sam2" / "model.safetensors"
    weights = load_file(str(weights_file))
    name = next(k for k in sorted(weights) if weights[k].ndim == 2)
    weights[name] = weights[name][:, :-1].contiguous()
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    line = main_command("--model", str(broken), "--stages", "lora", "--data-synthetic-train", "4")
    _assert_names(line, str(broken / "sam2"), name, str(list(weights[name].shape)), "config.json describes")


def test_main_command_names_a_hard_set_from_other_data(tmp_path, tiny_model_dir, main_command):
    run = tmp_path / "run"
    (run / "mining").mkdir(parents=True)
    (run / "mining" / "hard_samples.json").write_text(json.dumps({"hard": [{"id": "someone-elses-image"}]}))
    args = ("--model", str(tiny_model_dir), "--stages", "hsft", "--resume", "--data-synthetic-train", "4")
    _assert_names(main_command(*args), str(run / "mining" / "hard_samples.json"), "someone-elses-image")
    (run / "mining" / "hard_samples.json").write_text("{not json")
    _assert_names(main_command(*args), str(run / "mining" / "hard_samples.json"), "not valid JSON")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_main_command_refuses_cuda_graphs_without_a_gpu(main_command):
    _assert_names(main_command("--hsft-cuda-graph"), "--hsft-cuda-graph", "need a CUDA device")


@pytest.mark.parametrize("args, message", [
    (["--deepspeed", "missing.json"], "missing.json: no such file"),
    (["--stages", "hsft,base"], "pipeline order"),
    (["--data-format", "nope"], "unknown format 'nope'"),
    (["--hsft-lr", "-1"], "hsft.lr"),
    (["--recipe", "huge"], "recipe: must be 'paper' or 'tiny'"),
    (["--set", "hsft.train_feature_convs=true"], "hsft.train_feature_convs"),
    (["--stages", "hsft", "--output-dir", "empty"], "needs a starting model"),
    (["--model", "nowhere"], "--model nowhere: no such directory"),
    (["--vlm", "nowhere", "--sam2", "nowhere"], "model.vlm: checkpoint directory 'nowhere' does not exist"),
    (["--data-format", "drive", "--data-root", "."], "training: missing directory (DRIVE layout"),
])
def test_main_command_names_a_bad_option_or_setting(main_command, args, message):
    assert message in main_command(*args)
