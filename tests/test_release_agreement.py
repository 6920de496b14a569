"""launch/compare_with_release.py and hsft.model.release.agreement: bad input stops with one line
before any model is loaded, the comparison arithmetic, and the release runner's import of a user's
code directory. (The comparison itself needs the release's code, which hsft does not ship.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsft.model.release import ReleaseError, import_sa2va
from hsft.model.release.agreement import (
    COSINE_TARGET,
    DICE_TARGET,
    RELEASE_CODE_FILES,
    RUNNER,
    ImageResult,
    answer_ids,
    compare_results,
    compare_with_release,
    cosine,
    format_table,
    mask_dice,
)

from launch_scripts import launch_module
from release_checkpoints import write_release, write_sam2_config

cli = launch_module("compare_with_release")


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("agreement")
    src, _ = write_release(root / "src", dtype=torch.float32)
    import_sa2va(src, root / "model", sam2_config_file=write_sam2_config(root / "sam2.json"))
    return root / "model"


def _release_code(directory: Path, modeling: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in RELEASE_CODE_FILES:
        (directory / name).write_text("", encoding="utf-8")
    (directory / "modeling_sa2va_chat.py").write_text(modeling, encoding="utf-8")
    return directory


def _image(path: Path) -> Path:
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(path)
    return path


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_naming_the_argument(tmp_path, imported, capsys):
    code_dir = _release_code(tmp_path / "code")
    image = _image(tmp_path / "a.png")
    base = ["--release-code", str(code_dir), "--model", str(imported), "--images", str(image),
            "--release-python", sys.executable]

    def bad(replace: dict, expected: str) -> None:
        argv = list(base)
        for flag, value in replace.items():
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        status, err = _run_cli(argv, capsys)
        assert status == 2
        assert len(err.splitlines()) == 1 and expected in err, err

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "modeling_sa2va_chat.py").write_text("", encoding="utf-8")
    bad({"--release-code": str(incomplete)}, "not the release's remote code (missing configuration_sa2va_chat.py")
    bad({"--release-code": str(tmp_path / "nowhere")}, "--release-code")
    bad({"--model": str(tmp_path / "code")}, "not a model imported from a released Sa2VA checkpoint")
    bad({"--images": str(tmp_path / "missing.png")}, "--images")
    bad({"--prompt": "Please segment the blood vessel."}, "must start with <image>")
    bad({"--prompt": "<image>Segment [SEG]."}, "--prompt")
    bad({"--release-python": str(tmp_path / "python9")}, "--release-python")
    bad({"--max-new-tokens": "0"}, "--max-new-tokens")


def test_the_script_reports_a_directory_without_the_release_code(tmp_path, imported, capsys):
    image = _image(tmp_path / "a.png")
    status = cli.main(["--release-code", str(tmp_path), "--model", str(imported), "--images", str(image)])
    done = capsys.readouterr()
    assert status == 2 and done.out == ""
    assert done.err.strip().splitlines() == [
        f"launch/compare_with_release.py: error: --release-code {tmp_path}: not the release's remote code (missing "
        f"{', '.join(RELEASE_CODE_FILES)}; it is the directory holding modeling_sa2va_chat.py)"]


def test_a_failing_release_code_is_one_line(tmp_path, imported):
    code_dir = _release_code(tmp_path / "code", "raise ImportError('flash_attn is required')\n")
    with pytest.raises(ReleaseError, match=r"^the release's code failed under .*: ImportError: flash_attn is "
                                           r"required$"):
        compare_with_release(code_dir, imported, [_image(tmp_path / "a.png")], release_python=sys.executable,
                             echo=lambda _: None)


def test_runner_imports_the_users_code_as_a_package_without_hsft(tmp_path):
    code_dir = _release_code(tmp_path / "code", "from .templates import NAME\n")
    (code_dir / "templates.py").write_text("NAME = 'release templates'\n", encoding="utf-8")
    (code_dir / "sam2.py").write_text(textwrap.dedent("""
        class SAM2VideoPredictor:
            def init_state(self, images):
                return {"device": "cuda", "storage_device": "cuda", "images": images}
    """), encoding="utf-8")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("runner", {str(RUNNER)!r})
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        modeling = runner.import_release(__import__("pathlib").Path({str(code_dir)!r}))
        assert modeling.NAME == "release templates"
        shims = runner.install_cpu_shims()
        import torch
        t = torch.ones(2)
        assert t.cuda() is t and t.cuda(non_blocking=True) is t
        state = sys.modules["sa2va_release_code.sam2"].SAM2VideoPredictor().init_state([1])
        assert state["device"] == state["storage_device"] == torch.device("cpu") and state["images"] == [1]
        assert len(shims) == 2
        assert not [m for m in sys.modules if m == "hsft" or m.startswith("hsft.")]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_answer_ids_stop_at_the_first_end_token():
    assert answer_ids([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert answer_ids([5, 6], [2]) == [5, 6]
    assert answer_ids([2, 5], [2, 0]) == []


def test_mask_dice_and_cosine():
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    assert mask_dice(a, b) == 1.0  # both empty
    a[0, :] = True  # 4 pixels
    b[0, :2] = True  # 2 of them
    assert mask_dice(a, b) == pytest.approx(2 * 2 / 6)
    assert mask_dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="mask shapes differ"):
        mask_dice(a, np.zeros((4, 5), dtype=bool))
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert np.isnan(cosine(np.zeros(2), np.ones(2)))


def _result(ids, prompt, mask, tiles=1, text="Sure, [SEG]") -> ImageResult:
    return ImageResult(text=text, ids=ids, tiles=tiles, size=mask.shape, prompt=np.asarray(prompt, dtype=np.float32),
                       mask=mask)


def test_compare_results_and_the_targets():
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:4, 1:7] = True
    hsft = _result([5, 6, 2, 0, 0], [1.0, 2.0, 3.0], mask)  # generate pads after the end token
    release = _result([5, 6, 2], [1.0, 2.0, 3.0], mask)  # the release stops at it
    row = compare_results("a.png", hsft, release, [0, 2])
    assert (row.width, row.height) == (8, 6) and row.text_equal and row.passed
    assert row.cosine == pytest.approx(1.0) and row.dice == 1.0 and row.pixel_agreement == 1.0
    assert row.mask_fraction == pytest.approx(12 / 48)

    other = mask.copy()
    other[2, 1:7] = False  # half the foreground
    worse = compare_results("a.png", hsft, _result([5, 6, 2], [1.0, 2.0, 3.0], other), [0, 2])
    assert worse.dice == pytest.approx(2 * 6 / 18) and worse.dice < DICE_TARGET and not worse.passed
    turned = compare_results("a.png", hsft, _result([5, 6, 2], [1.0, 2.0, 3.3], mask), [0, 2])
    assert turned.cosine < 1.0 and turned.passed == (turned.cosine >= COSINE_TARGET)
    assert not compare_results("a.png", hsft, _result([5, 7, 2], [1.0, 2.0, 3.0], mask), [0, 2]).passed
    assert not compare_results("a.png", hsft, _result([5, 6, 2], [1.0, 2.0, 3.0], mask, tiles=3), [0, 2]).passed

    no_seg = ImageResult(text="Sure.", ids=[5, 2], tiles=1, size=(6, 8), prompt=None, mask=None)
    missing = compare_results("a.png", hsft, no_seg, [0, 2])
    assert np.isnan(missing.dice) and not missing.passed and (missing.width, missing.height) == (8, 6)

    table = format_table([row, worse, missing])
    assert table.count("| a.png | 8 x 6 | 1 / 1 |") == 3 and "| yes | yes |" in table and "| yes | NO |" in table
    assert "| 1.0000000 | 1.0000 | 1.00000 | 0.250 |" in table and "| no [SEG] | - | - | - | NO | NO |" in table
