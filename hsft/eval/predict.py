"""Prediction on image files: the generate path, as a user's inference runs, one mask per image at
the image's original size.

Images are decoded by hsft.data.imageio.read_rgb, the same reader the datasets use: RGB, greyscale
(L, 1), palette, RGBA / LA (alpha dropped), CMYK and 16-bit greyscale (I;16, I: scaled from the
full 16-bit range) become (H, W, 3) uint8; anything unreadable is refused naming the file.

A fundus photograph shows the retina inside a round camera aperture on a black frame. The mask and the
vessel fraction are restricted to that field of view, derived from the photograph as the dataset readers
derive it for datasets that ship none (hsft.data.fov): a model has no business marking the black frame,
and a fraction over the whole frame would count the frame as background. `fov=False` turns this off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hsft.data import DatasetError
from hsft.data.batches import chunks
from hsft.data.fov import derive_fov
from hsft.data.imageio import image_stem, read_rgb
from hsft.eval.errors import InputError
from hsft.eval.evaluator import unwrap_model
from hsft.eval.seg_paths import as_processor_list
from hsft.eval.overlays import PREDICTION_COLOUR, save_png, tint
from hsft.eval.report import visible_text, write_text
from hsft.eval.scoring import binary_mask
from hsft.model.modes import eval_mode

__all__ = ["Prediction", "check_images", "output_stems", "predict_images", "format_prediction"]


@dataclass
class Prediction:
    image: str
    text: str
    seg_emitted: bool
    num_seg: int
    height: int
    width: int
    vessel_fraction: float  # predicted vessel pixels / pixels inside the field of view
    fov_fraction: float  # pixels inside the field of view / all pixels (1 without a field of view)
    mask: str  # written files
    overlay: str


def check_images(paths: Sequence[Path]) -> None:
    """Decode every image once before the model runs, so a bad file stops the command at once, with
    every bad file named, instead of after the first batches."""
    if not paths:
        raise InputError("images: give at least one image file")
    problems = []
    for path in paths:
        if path.is_dir():
            problems.append(f"{path}: is a directory, not an image file")
            continue
        try:
            read_rgb(path)
        except DatasetError as error:
            problems.append(str(error))
    if problems:
        raise InputError(f"{len(problems)} of {len(paths)} image(s) cannot be used:\n  " + "\n  ".join(problems))


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per image: its file stem, with _2, _3 ... for repeated stems
    (a/img.png and b/img.png must not overwrite each other's mask)."""
    used: set[str] = set()
    stems = []
    for path in paths:
        base = image_stem(path)
        stem, k = base, 1
        while stem in used:
            k += 1
            stem = f"{base}_{k}"
        used.add(stem)
        stems.append(stem)
    return stems


@torch.no_grad()
def field_of_view(image: np.ndarray) -> np.ndarray:
    """The photograph's field of view (hsft.data.fov.derive_fov); the whole frame when none is found (an
    image without a dark frame, e.g. a crop of the retina)."""
    fov = derive_fov(image)
    return fov if fov.any() else np.ones(image.shape[:2], bool)


def predict_images(model, paths: Sequence[str | Path], out_dir: str | Path, *, batch_size: int = 8,
                   max_new_tokens: int = 16, logits_processor=None, progress: bool = True,
                   validate: bool = True, fov: bool = True) -> list[Prediction]:
    """Generate for each image; write `<stem>_mask.png` (0 / 255, the image's size), `<stem>_overlay.png`
    and `predictions.json` into out_dir. The mask is restricted to the field of view unless fov=False.
    validate=False skips check_images (the caller ran it)."""
    if batch_size < 1:
        raise InputError(f"batch_size: must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    files = [Path(p) for p in paths]
    if validate:
        check_images(files)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    net = unwrap_model(model)
    stems = output_stems(files)
    predictions: list[Prediction] = []
    with eval_mode(net), tqdm(total=len(files), desc="predict", unit="img", disable=not progress,
                              dynamic_ncols=True) as bar:
        for chunk in chunks(range(len(files)), batch_size):
            images = [read_rgb(files[i]) for i in chunk]
            generated = net.generate_seg(net.preprocess(images).to(dtype=net.dtype),
                                         max_new_tokens=max_new_tokens,
                                         logits_processor=as_processor_list(logits_processor))
            for row, (i, image) in enumerate(zip(chunk, images)):
                mask = binary_mask(generated.mask_logits[row], image.shape[:2]).cpu().numpy()
                inside = field_of_view(image) if fov else np.ones(image.shape[:2], bool)
                mask &= inside
                mask_path, overlay_path = out / f"{stems[i]}_mask.png", out / f"{stems[i]}_overlay.png"
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path, format="PNG")
                save_png(tint(image, mask, PREDICTION_COLOUR, alpha=0.6, dim=False), overlay_path)
                predictions.append(Prediction(
                    image=str(files[i]), text=generated.text[row], seg_emitted=bool(generated.seg_emitted[row]),
                    num_seg=int(generated.num_seg[row]), height=int(image.shape[0]), width=int(image.shape[1]),
                    vessel_fraction=float(mask.sum() / inside.sum()), fov_fraction=float(inside.mean()),
                    mask=str(mask_path), overlay=str(overlay_path),
                ))
            bar.update(len(chunk))
    write_text(out / "predictions.json", json.dumps([asdict(p) for p in predictions], indent=2) + "\n")
    return predictions


def format_prediction(prediction: Prediction) -> str:
    seg = f"[SEG] emitted: yes ({prediction.num_seg})" if prediction.seg_emitted else "[SEG] emitted: NO (empty mask)"
    return (f"{prediction.image}: {seg}; text: \"{visible_text(prediction.text)}\"; "
            f"{prediction.height}x{prediction.width}, vessel fraction {prediction.vessel_fraction:.4f} of the "
            + (f"field of view ({prediction.fov_fraction:.0%} of the frame)" if prediction.fov_fraction < 1
               else "frame") + f" -> {prediction.mask}")
