"""What a model directory is, without loading it: where a command finds it (the directory itself, or a
run's stage directory holding `model/`), and the training record it carries (`training.json`: the
recipe and precision it was trained with, and what the model is).

Light on purpose (no torch): the argument parser reads the record to pick the defaults a model continues
with, before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hsft.errors import BadValue, MissingFile

__all__ = ["META_FILE", "STAGE_MODEL_SUBDIR", "TRAINING_FILE", "resolve_model_dir", "read_training_record",
           "write_training_record", "describe_model"]

META_FILE = "hsft_model.json"  # written last by save_model: its presence marks a complete model directory
STAGE_MODEL_SUBDIR = "model"  # a pipeline stage directory keeps its model here
TRAINING_FILE = "training.json"
# What the embedded default model is, for every place that tells a user what they are running.
EMBEDDED_DESCRIPTION = ("the embedded default: a 0.4 M-parameter stand-in trained on synthetic fundus images, "
                        "for showing the pipeline at work; it is not a vessel segmenter for real photographs")


def resolve_model_dir(directory: str | os.PathLike, argument: str = "--model") -> Path:
    """The model directory `directory` names: itself, or its model/ when it is a run's stage directory.
    Raises one line naming `argument` when it is neither."""
    path = Path(directory)
    if not path.exists():
        raise MissingFile(f"{argument} {path}: no such directory")
    if not path.is_dir():
        raise BadValue(f"{argument} {path}: is a file, not a model directory")
    if (path / META_FILE).is_file():
        return path
    if (path / STAGE_MODEL_SUBDIR / META_FILE).is_file():
        return path / STAGE_MODEL_SUBDIR
    raise BadValue(f"{argument} {path}: not an hsft model directory ({META_FILE} is missing; give a directory "
                   f"written by hsft.model.save_model, or a run's stage directory holding {STAGE_MODEL_SUBDIR}/)")


def write_training_record(directory: str | os.PathLike, *, recipe: str | None, precision: str,
                          embedded_default: bool, stage: str) -> None:
    """Record in a model directory how it was trained (written atomically, beside the weights)."""
    path = Path(directory) / TRAINING_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"recipe": recipe, "precision": precision, "embedded_default": embedded_default,
                               "stage": stage}, indent=2) + "\n")
    tmp.replace(path)


def read_training_record(directory: str | os.PathLike) -> dict | None:
    """The record `write_training_record` left in a model directory (or its stage directory), or None: a
    model imported from a release, or written outside the pipeline."""
    path = Path(directory)
    for candidate in (path / TRAINING_FILE, path / STAGE_MODEL_SUBDIR / TRAINING_FILE):
        if candidate.is_file():
            try:
                record = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise BadValue(f"{candidate}: not valid JSON ({err})") from None
            return record if isinstance(record, dict) else None
    return None


def describe_model(directory: str | os.PathLike) -> str:
    """One line saying what the model in `directory` is, for commands that print predictions."""
    record = read_training_record(directory)
    if record is None:
        return "a model without a training record (imported from a release, or saved outside the pipeline)"
    if record.get("embedded_default"):
        return EMBEDDED_DESCRIPTION
    return f"a model fine-tuned by the pipeline (stage {record.get('stage')}, recipe {record.get('recipe')})"
