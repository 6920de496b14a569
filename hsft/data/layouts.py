"""Where each dataset keeps its files, and which files belong to which split.

This module only looks at names on disk: it pairs every image with its vessel ground truth and
FOV mask and assigns the standard split. Decoding and size checks happen in `hsft.data.scan`.

Layouts (exactly as distributed) and the splits used:

drive      root/training/images/21_training.tif, root/training/1st_manual/21_manual1.gif,
           root/training/mask/21_training_mask.gif; the same under root/test/ with `_test`.
           Split: training/ = train (20 images), test/ = test (20 images); the test split's
           1st_manual is the reference (2nd_manual is ignored).
stare      root/**/im0001.ppm[.gz] with the Hoover labels root/**/im0001.ah.ppm[.gz] (any
           subdirectories, gzipped or not; the `.vk.` second-observer labels are ignored).
           Only 20 of the 397 archive images are labelled; unlabelled images are ignored.
           Split: the first ten labelled images (im0001..im0139) train, the last ten
           (im0162..im0324) test -- the split of e.g. Li et al. (2016); STARE has no official one.
           No FOV masks ship: one is derived from the red channel (see hsft.data.fov).
chase_db1  root/Image_01L.jpg with root/Image_01L_1stHO.png (flat, as the archive unpacks;
           the _2ndHO labels are ignored). Split: images 01-10 (L and R, 20 images) train,
           11-14 (8 images) test, the customary CHASE_DB1 split. FOV derived as for STARE.
hrf        root/images/01_dr.JPG (any case of .jpg), root/manual1/01_dr.tif,
           root/mask/01_dr_mask.tif; categories h, dr, g with 15 images each.
           Split: images 01-05 of each category train (15 images), 06-15 test (30 images), the
           split of e.g. Orlando et al. (2017); HRF has no official one.
folder     root/images/<stem>.<ext>, root/masks/<stem>.<ext>, optional root/fov/<stem>.<ext>,
           matched by stem (any of the image suffixes in hsft.data.imageio). Either the
           split is given by directories (root/train/... and root/test/..., each in that layout)
           or, for a flat root, an image is in the test split when a SHA-256 hash of its
           lower-cased stem falls in the lowest FOLDER_TEST_FRACTION (20%) of the hash range:
           stable per image, so adding or removing files never moves an image between splits.
synthetic  with a root: read like `folder` (what `launch/data.py synth` writes); without a root
           the data is generated in memory (hsft.data.splits).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hsft.data.imageio import image_stem, is_image_file

__all__ = [
    "FORMATS",
    "SPLITS",
    "FOLDER_TEST_FRACTION",
    "STARE_TRAIN_IDS",
    "STARE_TEST_IDS",
    "FileEntry",
    "Listing",
    "list_split",
    "folder_split_of",
]

FORMATS = ("synthetic", "drive", "stare", "chase_db1", "hrf", "folder")
SPLITS = ("train", "test")

FOLDER_TEST_FRACTION = 0.2

STARE_TRAIN_IDS = ("im0001", "im0002", "im0003", "im0004", "im0005",
                   "im0044", "im0077", "im0081", "im0082", "im0139")
STARE_TEST_IDS = ("im0162", "im0163", "im0235", "im0236", "im0239",
                  "im0240", "im0255", "im0291", "im0319", "im0324")

FOV_FROM_FILE = "FOV mask files"
FOV_DERIVED = "derived from the red channel (the dataset ships no FOV masks)"
FOV_NONE = "none (metrics over the whole image)"


@dataclass(frozen=True)
class FileEntry:
    """One matched sample on disk, not yet decoded."""

    id: str
    image: Path
    mask: Path
    fov: Path | None
    derive_fov: bool


@dataclass
class Listing:
    """The result of listing one split: matched entries plus everything that is wrong."""

    entries: list[FileEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    fov_note: str = FOV_FROM_FILE


def folder_split_of(sample_id: str) -> str:
    """Split of an image in a flat folder layout: a stable function of its id alone."""
    digest = hashlib.sha256(sample_id.lower().encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if position < FOLDER_TEST_FRACTION else "train"


def _require_dir(path: Path, listing: Listing, hint: str) -> bool:
    if path.is_dir():
        return True
    what = "is not a directory" if path.exists() else "missing directory"
    listing.problems.append(f"{path}: {what} ({hint})")
    return False


def _collect(
    directory: Path,
    pattern: re.Pattern[str],
    listing: Listing,
    what: str,
    expected: str,
    *,
    recursive: bool = False,
    ignore: re.Pattern[str] | None = None,
    strict: bool = True,
) -> dict[str, Path]:
    """Map key -> file for the files in `directory` whose name matches `pattern`.

    The key is the pattern's groups joined by "_" (lower-cased). Image files that match neither
    `pattern` nor `ignore` are problems when `strict`, otherwise ignored; non-image files are
    always ignored (listed).
    """
    found: dict[str, Path] = {}
    files = sorted(directory.rglob("*") if recursive else directory.iterdir())
    for path in files:
        if path.is_dir():
            continue
        match = pattern.fullmatch(path.name)
        if match is None:
            if strict and is_image_file(path) and not (ignore and ignore.fullmatch(path.name)):
                listing.problems.append(f"{path}: unexpected file name for {what} (expected names like {expected})")
            else:
                listing.ignored.append(path)
            continue
        key = "_".join(group.lower() for group in match.groups() if group is not None)
        if key in found:
            listing.problems.append(f"{path}: duplicate {what} for {key!r} (also {found[key]})")
            continue
        found[key] = path
    return found


def _pair(
    listing: Listing,
    images: dict[str, Path],
    masks: dict[str, Path],
    fovs: dict[str, Path] | None,
    *,
    sample_id: Callable[[str, Path], str],
    expected_mask: Callable[[str], Path],
    expected_image: Callable[[str], Path],
    expected_fov: Callable[[str], Path] | None = None,
    derive_fov: bool = False,
) -> None:
    """Match images, masks and (when given) FOV masks by key; report every unpaired file."""
    for key, image in images.items():
        mask = masks.get(key)
        if mask is None:
            listing.problems.append(f"{image}: image has no vessel mask (expected {expected_mask(key)})")
            continue
        fov = None
        if fovs is not None:
            fov = fovs.get(key)
            if fov is None:
                listing.problems.append(f"{image}: image has no FOV mask (expected {expected_fov(key)})")
                continue
        listing.entries.append(FileEntry(sample_id(key, image), image, mask, fov, derive_fov))
    for key, mask in masks.items():
        if key not in images:
            listing.problems.append(f"{mask}: vessel mask has no image (expected {expected_image(key)})")
    for key, fov in (fovs or {}).items():
        if key not in images:
            listing.problems.append(f"{fov}: FOV mask has no image (expected {expected_image(key)})")


def _list_drive(root: Path, split: str) -> Listing:
    listing = Listing()
    word = "training" if split == "train" else "test"
    base = root / word
    hint = "DRIVE layout: training/ and test/, each with images/, 1st_manual/ and mask/"
    if not _require_dir(base, listing, hint):
        return listing
    dirs = {name: base / name for name in ("images", "1st_manual", "mask")}
    present = {name: _require_dir(path, listing, hint) for name, path in dirs.items()}
    if not present["1st_manual"] and split == "test":
        listing.problems[-1] += "; some DRIVE copies omit the test manuals, but evaluation needs them"
    if not all(present.values()):
        return listing
    flags = re.IGNORECASE
    images = _collect(dirs["images"], re.compile(rf"(\d+)_{word}\.tiff?", flags), listing,
                      "a DRIVE image", f"21_{word}.tif")
    masks = _collect(dirs["1st_manual"], re.compile(r"(\d+)_manual1\.gif", flags), listing,
                     "a DRIVE manual segmentation", "21_manual1.gif")
    fovs = _collect(dirs["mask"], re.compile(rf"(\d+)_{word}_mask\.gif", flags), listing,
                    "a DRIVE FOV mask", f"21_{word}_mask.gif")
    if not images:
        listing.problems.append(f"{dirs['images']}: empty directory (no DRIVE images named like 21_{word}.tif)")
    _pair(
        listing, images, masks, fovs,
        sample_id=lambda key, path: image_stem(path),
        expected_mask=lambda key: dirs["1st_manual"] / f"{key}_manual1.gif",
        expected_image=lambda key: dirs["images"] / f"{key}_{word}.tif",
        expected_fov=lambda key: dirs["mask"] / f"{key}_{word}_mask.gif",
    )
    return listing


def _list_stare(root: Path, split: str) -> Listing:
    listing = Listing(fov_note=FOV_DERIVED)
    if not _require_dir(root, listing, "STARE: im0001.ppm[.gz] and im0001.ah.ppm[.gz] anywhere below it"):
        return listing
    known = set(STARE_TRAIN_IDS) | set(STARE_TEST_IDS)
    wanted = set(STARE_TRAIN_IDS if split == "train" else STARE_TEST_IDS)
    images = _collect(root, re.compile(r"(im\d{4})\.ppm(?:\.gz)?"), listing, "a STARE image",
                      "im0001.ppm", recursive=True, strict=False)
    labels = _collect(root, re.compile(r"(im\d{4})\.ah\.ppm(?:\.gz)?"), listing, "a STARE label",
                      "im0001.ah.ppm", recursive=True, strict=False)
    # A listing ignores everything it did not match; the images are matched by the first pattern,
    # so drop them from `ignored` (they appear there from the label pass).
    matched = set(images.values()) | set(labels.values())
    listing.ignored = [path for path in dict.fromkeys(listing.ignored) if path not in matched]
    for key, label in labels.items():
        if key not in known:
            listing.problems.append(
                f"{label}: {key} is not one of the 20 labelled STARE images, so it has no standard split"
            )
    for key, image in list(images.items()):
        if key not in wanted:
            if key not in known and key not in labels:
                listing.ignored.append(image)  # the unlabelled part of the STARE archive
            del images[key]
    labels = {key: path for key, path in labels.items() if key in wanted}
    if not images and not labels:
        listing.problems.append(
            f"{root}: no labelled STARE images of the {split} split found "
            f"(expected e.g. {sorted(wanted)[0]}.ppm[.gz] with {sorted(wanted)[0]}.ah.ppm[.gz])"
        )
    _pair(
        listing, images, labels, None,
        sample_id=lambda key, path: key,
        expected_mask=lambda key: images[key].parent / f"{key}.ah.ppm[.gz]",
        expected_image=lambda key: labels[key].parent / f"{key}.ppm[.gz]",
        derive_fov=True,
    )
    return listing


def _list_chase(root: Path, split: str) -> Listing:
    listing = Listing(fov_note=FOV_DERIVED)
    if not _require_dir(root, listing, "CHASE_DB1: Image_01L.jpg and Image_01L_1stHO.png side by side"):
        return listing
    flags = re.IGNORECASE
    second_observer = re.compile(r"Image_\d{2}[LR]_2ndHO\.png", flags)
    images = _collect(root, re.compile(r"Image_(\d{2})([LR])\.jpe?g", flags), listing, "a CHASE_DB1 image",
                      "Image_01L.jpg", ignore=re.compile(r"Image_\d{2}[LR]_(?:1st|2nd)HO\.png", flags))
    masks = _collect(root, re.compile(r"Image_(\d{2})([LR])_1stHO\.png", flags), listing,
                     "a CHASE_DB1 label", "Image_01L_1stHO.png", strict=False, ignore=second_observer)
    listing.ignored = [p for p in dict.fromkeys(listing.ignored)
                       if p not in set(images.values()) | set(masks.values())]

    def split_of(key: str) -> str | None:
        number = int(key.split("_")[0])
        if not 1 <= number <= 14:
            return None
        return "train" if number <= 10 else "test"

    for key, path in list(images.items()) + list(masks.items()):
        if split_of(key) is None:
            listing.problems.append(f"{path}: CHASE_DB1 numbers images 01-14, so this file has no standard split")
    images = {k: p for k, p in images.items() if split_of(k) == split}
    masks = {k: p for k, p in masks.items() if split_of(k) == split}
    if not images and not masks:
        listing.problems.append(f"{root}: no CHASE_DB1 images of the {split} split (expected e.g. Image_01L.jpg)")

    def name(key: str) -> str:
        number, side = key.split("_")
        return f"Image_{number}{side.upper()}"

    _pair(
        listing, images, masks, None,
        sample_id=lambda key, path: image_stem(path),
        expected_mask=lambda key: root / f"{name(key)}_1stHO.png",
        expected_image=lambda key: root / f"{name(key)}.jpg",
        derive_fov=True,
    )
    return listing


def _list_hrf(root: Path, split: str) -> Listing:
    listing = Listing()
    hint = "HRF layout: images/, manual1/ and mask/"
    if not _require_dir(root, listing, hint):
        return listing
    dirs = {name: root / name for name in ("images", "manual1", "mask")}
    if not all([_require_dir(path, listing, hint) for path in dirs.values()]):  # report every missing dir
        return listing
    flags = re.IGNORECASE
    images = _collect(dirs["images"], re.compile(r"(\d{2})_(h|dr|g)\.jpe?g", flags), listing,
                      "an HRF image", "01_dr.JPG")
    masks = _collect(dirs["manual1"], re.compile(r"(\d{2})_(h|dr|g)\.tiff?", flags), listing,
                     "an HRF manual segmentation", "01_dr.tif")
    fovs = _collect(dirs["mask"], re.compile(r"(\d{2})_(h|dr|g)_mask\.tiff?", flags), listing,
                    "an HRF FOV mask", "01_dr_mask.tif")
    if not images:
        listing.problems.append(f"{dirs['images']}: empty directory (no HRF images named like 01_dr.JPG)")

    def split_of(key: str) -> str | None:
        number = int(key.split("_")[0])
        if not 1 <= number <= 15:
            return None
        return "train" if number <= 5 else "test"

    for group in (images, masks, fovs):
        for key, path in list(group.items()):
            if split_of(key) is None:
                listing.problems.append(f"{path}: HRF numbers images 01-15 per category, so this file has no split")
            if split_of(key) != split:
                del group[key]
    _pair(
        listing, images, masks, fovs,
        sample_id=lambda key, path: image_stem(path),
        expected_mask=lambda key: dirs["manual1"] / f"{key}.tif",
        expected_image=lambda key: dirs["images"] / f"{key}.JPG",
        expected_fov=lambda key: dirs["mask"] / f"{key}_mask.tif",
    )
    return listing


def _list_folder_dir(base: Path, listing: Listing, keep: Callable[[str], bool]) -> None:
    """Images/masks/fov of one folder-layout directory; keep(key) selects the split's (lower-cased) stems."""
    hint = "folder layout: images/, masks/ and optionally fov/, matched by file stem"
    # Both checks run (no short-circuit) so a missing images/ and masks/ are both reported.
    if not all([_require_dir(base / "images", listing, hint), _require_dir(base / "masks", listing, hint)]):
        return
    any_image = re.compile(r"(.+?)\.(?:png|jpe?g|tiff?|gif|ppm|pgm|pbm|bmp)(?:\.gz)?", re.IGNORECASE)
    expected = "name.png (any of png, jpg, tif, gif, ppm, bmp)"
    images = _collect(base / "images", any_image, listing, "an image", expected)
    masks = _collect(base / "masks", any_image, listing, "a vessel mask", expected)
    fov_dir = base / "fov"
    fovs = _collect(fov_dir, any_image, listing, "a FOV mask", expected) if fov_dir.is_dir() else None
    if not images:
        listing.problems.append(f"{base / 'images'}: empty directory (no image files)")
    if fovs is None:
        listing.fov_note = FOV_NONE
    # _collect lower-cases keys; the sample id keeps the file's own spelling.
    images = {k: p for k, p in images.items() if keep(k)}
    masks = {k: p for k, p in masks.items() if keep(k)}
    if fovs is not None:
        fovs = {k: p for k, p in fovs.items() if keep(k)}
    def spelled(key: str) -> str:
        """The stem as the user spelled it (keys are lower-cased)."""
        for group in (images, masks, fovs or {}):
            if key in group:
                return image_stem(group[key])
        return key

    _pair(
        listing, images, masks, fovs,
        sample_id=lambda key, path: image_stem(path),
        expected_mask=lambda key: base / "masks" / f"{spelled(key)}.png",
        expected_image=lambda key: base / "images" / f"{spelled(key)}.png",
        expected_fov=lambda key: fov_dir / f"{spelled(key)}.png",
    )


def _list_folder(root: Path, split: str) -> Listing:
    listing = Listing()
    hint = "folder layout: images/ and masks/ (optionally fov/), or train/ and test/ each holding them"
    if not _require_dir(root, listing, hint):
        return listing
    flat = (root / "images").is_dir()
    by_split = (root / "train").is_dir() or (root / "test").is_dir()
    if flat and by_split:
        listing.problems.append(f"{root}: has both images/ and train/ or test/; use one layout")
        return listing
    if by_split:
        _list_folder_dir(root / split, listing, keep=lambda stem: True)
    elif flat:
        _list_folder_dir(root, listing, keep=lambda stem: folder_split_of(stem) == split)
        if not listing.entries and not listing.problems:
            listing.problems.append(
                f"{root}: no image of this flat folder hashes into the {split} split "
                "(too few images; put them in train/ and test/ subdirectories instead)"
            )
    else:
        listing.problems.append(f"{root}: expected images/ and masks/, or train/ and test/ ({hint})")
    return listing


_LISTERS = {
    "drive": _list_drive,
    "stare": _list_stare,
    "chase_db1": _list_chase,
    "hrf": _list_hrf,
    "folder": _list_folder,
    "synthetic": _list_folder,
}


def list_split(format: str, root: Path, split: str) -> Listing:
    """List (without decoding) the files of one split of a dataset on disk."""
    if format not in _LISTERS:
        raise ValueError(f"unknown dataset format {format!r}; valid formats are {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    listing = _LISTERS[format](Path(root), split)
    listing.problems = list(dict.fromkeys(listing.problems))
    return listing
