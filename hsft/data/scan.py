"""Scanning a dataset: find its files, validate every one, and hand out cheap references.

Validation happens at scan time, so a broken dataset fails when a command starts rather than
mid-training: every image, vessel mask and FOV mask is decoded once (which catches unreadable,
truncated and corrupt files) and their sizes are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsft.data.fov import derive_fov
from hsft.data.imageio import probe_size, read_binary, read_rgb
from hsft.data.layouts import FORMATS, SPLITS, FileEntry, list_split
from hsft.data.sample import DatasetError, Sample

__all__ = ["SampleRef", "SplitScan", "inspect_split", "scan_dataset"]

# At most this many problems are spelled out in an exception message (all are in .problems).
_PROBLEMS_IN_MESSAGE = 20


@dataclass(frozen=True)
class SampleRef:
    """A validated sample on disk: paths and size only; `load()` reads the pixels."""

    id: str
    split: str
    image_path: Path
    mask_path: Path
    fov_path: Path | None
    derive_fov: bool
    height: int
    width: int

    @property
    def source(self) -> str:
        return str(self.image_path)

    def load(self) -> Sample:
        image = read_rgb(self.image_path)
        mask = read_binary(self.mask_path)
        if self.fov_path is not None:
            fov = read_binary(self.fov_path)
        elif self.derive_fov:
            fov = derive_fov(image)
        else:
            fov = None
        # Re-checked because the files may have changed since the scan.
        for path, array in ((self.mask_path, mask), (self.fov_path, fov)):
            if array is not None and array.shape != image.shape[:2]:
                raise DatasetError(
                    f"{path}: size {array.shape[1]}x{array.shape[0]} does not match its image "
                    f"{self.image_path} ({image.shape[1]}x{image.shape[0]})"
                )
        return Sample(id=self.id, image=image, mask=mask, fov=fov, source=self.source)


@dataclass
class SplitScan:
    """Everything found while scanning one split."""

    format: str
    root: Path
    split: str
    refs: list[SampleRef]
    problems: list[str]
    ignored: list[Path]
    fov_note: str


def _validate(entry: FileEntry, split: str, problems: list[str]) -> SampleRef | None:
    sizes: dict[Path, tuple[int, int]] = {}
    for path in (entry.image, entry.mask, entry.fov):
        if path is None:
            continue
        try:
            sizes[path] = probe_size(path)
        except DatasetError as error:
            problems.extend(error.problems)
    if entry.image not in sizes:
        return None
    height, width = sizes[entry.image]
    valid = len(sizes) == (3 if entry.fov is not None else 2)
    for path, (h, w) in sizes.items():
        if (h, w) != (height, width):
            kind = "FOV mask" if path == entry.fov else "vessel mask"
            problems.append(
                f"{path}: {kind} size {w}x{h} does not match its image {entry.image} ({width}x{height})"
            )
            valid = False
    if not valid:
        return None
    return SampleRef(entry.id, split, entry.image, entry.mask, entry.fov, entry.derive_fov, height, width)


def _check_root(format: str, root: str | Path | None) -> Path:
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; valid formats are {', '.join(FORMATS)}")
    if root is None:
        if format == "synthetic":
            raise DatasetError(
                "format 'synthetic' without a root is generated in memory by hsft.data.load_splits; "
                "give a root to read a set written by `launch/data.py synth`"
            )
        raise DatasetError(f"format {format!r} needs a root directory")
    path = Path(root)
    if not path.exists():
        raise DatasetError(f"{path}: dataset root does not exist")
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset root is not a directory")
    return path


def inspect_split(format: str, root: str | Path | None, split: str) -> SplitScan:
    """Scan one split and collect every problem instead of stopping at the first.

    Raises DatasetError only when nothing can be scanned at all (unknown format, missing root).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    path = _check_root(format, root)
    listing = list_split(format, path, split)
    problems = list(listing.problems)
    refs = [ref for entry in listing.entries if (ref := _validate(entry, split, problems)) is not None]
    ids = [ref.id for ref in refs]
    duplicates = sorted({sample_id for sample_id in ids if ids.count(sample_id) > 1})
    for sample_id in duplicates:
        paths = ", ".join(str(ref.image_path) for ref in refs if ref.id == sample_id)
        problems.append(f"{paths}: several images share the sample id {sample_id!r}")
    return SplitScan(format, path, split, refs, list(dict.fromkeys(problems)), listing.ignored, listing.fov_note)


def scan_dataset(format: str, root: str | Path | None, *, split: str) -> list[SampleRef]:
    """Find and validate the samples of one split ("train" or "test") of a dataset on disk.

    Raises DatasetError naming every bad file (unreadable or corrupt image, size mismatch between
    image, mask and FOV, a mask without an image or an image without a mask, an empty directory)
    or the bad argument (unknown format, missing root). Returns the refs sorted by id.
    """
    scan = inspect_split(format, root, split)
    if len(scan.problems) == 1:
        # One problem, one line: it already names the file and what is wrong with it.
        raise DatasetError(f"{format} dataset, {split} split: {scan.problems[0]}", problems=scan.problems)
    if scan.problems:
        shown = scan.problems[:_PROBLEMS_IN_MESSAGE]
        more = len(scan.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        raise DatasetError(
            f"{format} dataset at {scan.root}, {split} split: {len(scan.problems)} problem(s):\n  {lines}",
            problems=scan.problems,
        )
    return sorted(scan.refs, key=lambda ref: ref.id)
