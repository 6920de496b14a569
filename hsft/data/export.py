"""Writing samples to disk in the folder layout (images/, masks/, fov/ as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from hsft.errors import BadValue
from hsft.data.sample import Sample
from hsft.data.synthetic import MIN_SIZE, make_fundus

__all__ = ["write_sample", "write_synthetic_set"]


def write_sample(sample: Sample, out_dir: Path) -> None:
    """Write one sample as out_dir/{images,masks,fov}/<id>.png (masks as 0/255 greyscale)."""
    out_dir = Path(out_dir)
    for sub in ("images", "masks", "fov"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.image).save(out_dir / "images" / f"{sample.id}.png")
    Image.fromarray(sample.mask.astype(np.uint8) * 255).save(out_dir / "masks" / f"{sample.id}.png")
    if sample.fov is not None:
        Image.fromarray(sample.fov.astype(np.uint8) * 255).save(out_dir / "fov" / f"{sample.id}.png")


def write_synthetic_set(out_dir: str | Path, n: int, seed: int, size: int = 128, progress: bool = True) -> int:
    """Generate `n` synthetic samples with generator seeds seed, seed+1, ..., seed+n-1 and write
    them in the folder layout. Returns the number written.

    Refuses to write into a directory that already holds images: mixing two sets silently (or
    overlapping seed ranges) would make the stable per-file split meaningless.
    """
    if n < 1:
        raise BadValue(f"--n: must be >= 1, got {n}")
    if seed < 0:
        raise BadValue(f"--seed: must be >= 0, got {seed}")
    if size < MIN_SIZE:
        raise BadValue(f"--size: must be >= {MIN_SIZE}, got {size}")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    if images.is_dir() and any(images.iterdir()):
        raise BadValue(f"{images}: already holds files; write the synthetic set to an empty directory")
    for index in tqdm(range(n), desc=f"synthetic {size}px", unit="img", disable=not progress):
        write_sample(make_fundus(seed + index, size), out_dir)
    return n
