"""Agreement of an imported checkpoint's inference in hsft with the release's OWN inference code.

The imported model is exported back to the release's format (a temporary directory) and run twice
on the same images and prompt, in float32 on the CPU:

- by the release's `predict_forward`, imported from the user's copy of the release's remote code
  (hsft ships none of it), in a separate process (`release_runner.py`) under the Python of an
  environment where that code runs (it was written for transformers 4.x);
- by hsft's inference path, the one `launch/predict.py` uses (generate_seg, then binary_mask).

Compared per image: the [SEG] prompt the mask decoder receives (text_hidden_fcs of the [SEG] state;
cosine), the mask at the image's size (Dice and the fraction of equal pixels) and the generated
answer (token ids up to the end token). Targets: cosine >= 0.999 and Dice >= 0.99.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsft.model.config import IMAGE_PLACEHOLDER, validate_instruction
from hsft.model.release.importer import LAYOUT_FILE
from hsft.model.release.source import ReleaseError

__all__ = ["RELEASE_CODE_FILES", "COSINE_TARGET", "DICE_TARGET", "DEFAULT_PROMPT", "ImageResult", "Agreement",
           "check_release_code", "check_inputs", "compare_with_release", "compare_results", "answer_ids",
           "mask_dice", "cosine", "format_table"]

# The release's remote-code files predict_forward needs (modeling_sa2va_chat imports the others).
RELEASE_CODE_FILES = ("modeling_sa2va_chat.py", "configuration_sa2va_chat.py", "modeling_intern_vit.py",
                      "configuration_intern_vit.py", "sam2.py", "templates.py")
COSINE_TARGET = 0.999
DICE_TARGET = 0.99
# Sa2VA's own example prompt; predict_forward puts the image where <image> stands.
DEFAULT_PROMPT = "<image>Please segment the blood vessel."
RUNNER = Path(__file__).with_name("release_runner.py")


@dataclass
class ImageResult:
    """One side's inference on one image."""

    text: str
    ids: list[int]              # the generated token ids (as generate returned them)
    tiles: int                  # VLM tiles the image was cut into
    size: tuple[int, int]       # (H, W) of the image
    prompt: np.ndarray | None   # (C,) the first [SEG]'s mask-decoder prompt; None without [SEG]
    mask: np.ndarray | None     # (H, W) bool at the image's size; None without [SEG]


@dataclass
class Agreement:
    image: str
    width: int
    height: int
    tiles_hsft: int
    tiles_release: int
    cosine: float               # nan when a side emitted no [SEG]
    dice: float
    pixel_agreement: float
    mask_fraction: float        # foreground fraction of the release's mask
    text_equal: bool
    text_hsft: str
    text_release: str

    @property
    def passed(self) -> bool:
        return (self.tiles_hsft == self.tiles_release and self.text_equal and self.cosine >= COSINE_TARGET
                and self.dice >= DICE_TARGET)


# ---------------------------------------------------------------- pure comparison

def answer_ids(ids: Sequence[int], end_ids: Sequence[int]) -> list[int]:
    """The generated ids before the first end token (generate may pad after it, or stop at it)."""
    out = []
    for token in ids:
        if int(token) in end_ids:
            break
        out.append(int(token))
    return out


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"prompt widths differ: {a.shape} vs {b.shape}")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else float("nan")


def compare_results(image: str, hsft: ImageResult, release: ImageResult, end_ids: Sequence[int]) -> Agreement:
    both = hsft.mask is not None and release.mask is not None
    if both:
        dice = mask_dice(hsft.mask, release.mask)
        agreement = float((hsft.mask == release.mask).mean())
        fraction = float(release.mask.mean())
        cos = cosine(hsft.prompt, release.prompt)
        height, width = release.mask.shape
    else:
        dice = agreement = fraction = cos = float("nan")
        height, width = release.size
    return Agreement(image=image, width=width, height=height, tiles_hsft=hsft.tiles, tiles_release=release.tiles,
                     cosine=cos, dice=dice, pixel_agreement=agreement, mask_fraction=fraction,
                     text_equal=answer_ids(hsft.ids, end_ids) == answer_ids(release.ids, end_ids),
                     text_hsft=hsft.text, text_release=release.text)


def format_table(rows: Sequence[Agreement]) -> str:
    lines = ["| image | size (W x H) | tiles (hsft / release) | [SEG] prompt cosine | mask Dice | equal pixels "
             "| release mask fg | answer equal | within targets |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if np.isnan(r.dice):  # a side emitted no [SEG]: no prompt or mask to compare
            numbers = "no [SEG] | - | - | -"
        else:
            numbers = f"{r.cosine:.7f} | {r.dice:.4f} | {r.pixel_agreement:.5f} | {r.mask_fraction:.3f}"
        lines.append(f"| {Path(r.image).name} | {r.width} x {r.height} | {r.tiles_hsft} / {r.tiles_release} "
                     f"| {numbers} | {'yes' if r.text_equal else 'NO'} | {'yes' if r.passed else 'NO'} |")
    texts = {(r.text_hsft, r.text_release) for r in rows}
    for hsft, release in sorted(texts):
        lines.append(f"answer: hsft {hsft!r}, release {release!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs

def check_release_code(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise ReleaseError(f"--release-code {path}: no such directory")
    missing = [name for name in RELEASE_CODE_FILES if not (path / name).is_file()]
    if missing:
        raise ReleaseError(f"--release-code {path}: not the release's remote code (missing {', '.join(missing)}; "
                           "it is the directory holding modeling_sa2va_chat.py)")
    return path


def check_inputs(release_code: str | os.PathLike, model_dir: str | os.PathLike, images: Sequence[str | os.PathLike],
                 prompt: str, release_python: str | os.PathLike, max_new_tokens: int) -> None:
    """Every argument checked before any model is loaded; one ReleaseError line naming the argument."""
    check_release_code(release_code)
    model = Path(model_dir)
    if not model.is_dir():
        raise ReleaseError(f"--model {model}: no such directory")
    if not (model / "release" / LAYOUT_FILE).is_file():
        raise ReleaseError(f"--model {model}: not a model imported from a released Sa2VA checkpoint "
                           f"(no release/{LAYOUT_FILE}; import one with launch/convert.py import-sa2va)")
    if not images:
        raise ReleaseError("--images: give at least one image")
    for image in images:
        if not Path(image).is_file():
            raise ReleaseError(f"--images {image}: no such file")
    try:
        validate_instruction(prompt, "--prompt")
    except ValueError as error:
        raise ReleaseError(str(error)) from None
    if not prompt.startswith(IMAGE_PLACEHOLDER):
        raise ReleaseError(f"--prompt {prompt!r}: must start with {IMAGE_PLACEHOLDER} (the release's predict_forward "
                           "puts the image only where <image> stands)")
    if not Path(release_python).is_file():
        raise ReleaseError(f"--release-python {release_python}: no such file")
    if max_new_tokens < 1:
        raise ReleaseError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")


# ---------------------------------------------------------------- the two sides

def run_release(release_python: str | os.PathLike, release_code: Path, checkpoint: Path, images: Sequence[Path],
                prompt: str, max_new_tokens: int, out: Path) -> tuple[list[ImageResult], dict]:
    command = [str(release_python), str(RUNNER), "--code", str(release_code), "--checkpoint", str(checkpoint),
               "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), "--out", str(out),
               *[str(p) for p in images]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ReleaseError(f"the release's code failed under {release_python}: {last[0]}")
    data = np.load(out)
    meta = json.loads(str(data["meta"]))
    results = []
    for k, info in enumerate(meta["images"]):
        has = info["has_mask"]
        results.append(ImageResult(text=info["text"], ids=data[f"ids_{k}"].tolist(), tiles=int(info["tiles"]),
                                   size=(int(info["height"]), int(info["width"])),
                                   prompt=data[f"prompt_{k}"] if has else None,
                                   mask=data[f"mask_{k}"] if has else None))
    return results, meta


def run_hsft(model_dir: Path, images: Sequence[Path], prompt: str, max_new_tokens: int
             ) -> tuple[list[ImageResult], list[int]]:
    """hsft's inference as launch/predict.py runs it (float32, CPU, one image per generate call)."""
    import dataclasses

    import torch

    from hsft.data.imageio import read_rgb
    from hsft.model.checkpoint import load_model
    from hsft.model.directory import resolve_model_dir
    from hsft.ops import upsample_masks

    model = load_model(resolve_model_dir(model_dir, "--model"), device="cpu", dtype="float32")
    model.prompt = dataclasses.replace(model.prompt, instruction=prompt)
    model.eval()
    results = []
    with torch.no_grad():
        for path in images:
            image = read_rgb(path)
            batch = model.preprocess([image]).to(dtype=model.dtype)
            out = model.generate_seg(batch, max_new_tokens=max_new_tokens)
            emitted = bool(out.seg_emitted[0])
            results.append(ImageResult(
                text=out.text[0], ids=out.generated_ids[0].tolist(), tiles=int(batch.num_tiles[0]),
                size=(int(image.shape[0]), int(image.shape[1])),
                prompt=out.seg_embedding[0].float().numpy() if emitted else None,
                # The mask convention: bilinear upsampling to the image's size, logit > 0.
                mask=upsample_masks(out.mask_logits[0][None].float(), image.shape[:2], threshold=0.0)[0].bool()
                .cpu().numpy() if emitted else None))
    end_ids = sorted({int(model.eos_token_id), int(model.pad_token_id)})
    return results, end_ids


def compare_with_release(release_code: str | os.PathLike, model_dir: str | os.PathLike,
                         images: Sequence[str | os.PathLike], *, prompt: str = DEFAULT_PROMPT,
                         max_new_tokens: int = 16, release_python: str | os.PathLike = sys.executable,
                         echo=print) -> tuple[list[Agreement], dict]:
    """Run both sides and compare them; returns one Agreement per image and the release side's
    environment (torch / transformers versions, the CPU shims it applied)."""
    check_inputs(release_code, model_dir, images, prompt, release_python, max_new_tokens)
    from hsft.model.release.exporter import export_sa2va

    code, model, files = Path(release_code), Path(model_dir), [Path(p) for p in images]
    with tempfile.TemporaryDirectory(prefix="hsft-release-agreement-") as tmp:
        exported = Path(tmp) / "checkpoint"
        echo(f"exporting {model} to the release's format ...")
        export_sa2va(model, exported)
        echo(f"running the release's predict_forward ({release_python}) ...")
        released, meta = run_release(release_python, code, exported, files, prompt, max_new_tokens,
                                     Path(tmp) / "release.npz")
    echo("running hsft's inference ...")
    ours, end_ids = run_hsft(model, files, prompt, max_new_tokens)
    rows = [compare_results(str(p), h, r, end_ids) for p, h, r in zip(files, ours, released)]
    return rows, meta
