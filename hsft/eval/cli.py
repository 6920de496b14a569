"""What `launch/evaluate.py` and `launch/predict.py` do once their arguments are parsed."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hsft.data.config import DataConfig
from hsft.eval.config import EvalConfig
from hsft.data import Sample, load_splits, scan_dataset
from hsft.engine.tensorboard import TBWriter
from hsft.eval.compare import compare_summaries, format_comparison, write_comparison
from hsft.command_line import prepare_output_dir
from hsft.errors import UserError
from hsft.eval.errors import InputError
from hsft.eval.evaluator import evaluate_model
from hsft.eval.predict import Prediction, check_images, format_prediction, predict_images
from hsft.eval.report import format_summary_table
from hsft.model import Sa2VAModel, load_model
from hsft.model.directory import describe_model
from hsft.model.directory import resolve_model_dir as find_model_dir
from hsft.model.config import validate_instruction

__all__ = ["add_inference_options", "EVAL_SPLITS", "EvaluateOptions", "resolve_device", "resolve_model_dir", "load_checkpoint",
           "load_eval_samples", "run_evaluate", "run_predict"]

EVAL_SPLITS = ("test", "val", "train")


@dataclass
class EvaluateOptions:
    """The configurable part of launch/evaluate.py: which data, and the evaluation settings
    (one command-line option per field, see hsft.arguments)."""

    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
COMPARE_SUBDIR = "compare"


def add_inference_options(parser) -> None:
    """--device, --dtype and --prompt: how launch/evaluate.py and launch/predict.py run the model."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype (default: as saved)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="the instruction (default: the model's configured one); the model's chat template "
                             "wraps it, and a leading <image> marks where the image goes, as Sa2VA's examples write it")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"--device {name!r}: not a device name ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_model_dir(directory: str | Path, argument: str = "--checkpoint") -> Path:
    """The model directory: `directory` itself, or its model/ when it is a pipeline stage directory."""
    try:
        return find_model_dir(directory, argument)
    except UserError as error:
        raise InputError(str(error)) from None


def check_prompt(prompt: str | None) -> None:
    """--prompt: the instruction that replaces the model's configured one (a leading <image> is
    accepted, as Sa2VA's own examples write it)."""
    if prompt is None:
        return
    try:
        validate_instruction(prompt, "--prompt")
    except ValueError as error:
        raise InputError(str(error)) from None


def load_checkpoint(directory: str | Path, *, device: torch.device | str = "cpu", dtype: str | None = None,
                    argument: str = "--checkpoint", prompt: str | None = None) -> Sa2VAModel:
    """The model in `directory` on `device`, asked `prompt` instead of its configured instruction
    when given."""
    path = resolve_model_dir(directory, argument)
    check_prompt(prompt)
    try:
        model = load_model(path, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise InputError(f"{argument} {path}: cannot load the model ({error})") from error
    if prompt is not None:
        model.prompt = dataclasses.replace(model.prompt, instruction=prompt)
    return model


def load_eval_samples(data: DataConfig, split: str = "test", limit: int | None = None) -> list[Sample]:
    """The samples of one split; `limit` keeps the first N (test splits are sorted by id)."""
    if split not in EVAL_SPLITS:
        raise InputError(f"--split {split!r}: must be one of {', '.join(EVAL_SPLITS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit: must be >= 1, got {limit}")
    try:
        data.validate()
    except ValueError as error:
        raise InputError(str(error)) from None
    if split == "test" and data.root is not None:
        # Only the test files are decoded (a real training split can be large).
        samples = [ref.load() for ref in scan_dataset(data.format, data.root, split="test")]
    elif split == "test":
        # The embedded synthetic test split does not depend on the training split's settings; a
        # token training split keeps the generation short.
        samples = load_splits(dataclasses.replace(data, synthetic_train=2, val_fraction=0.0)).test
    else:
        samples = getattr(load_splits(data), split)
    if not samples:
        raise InputError(f"--split {split}: the split is empty")
    return samples[:limit] if limit is not None else samples


def _prepare_output(output: str | Path, overwrite: bool) -> Path:
    try:
        return prepare_output_dir(output, overwrite)
    except UserError as error:
        raise InputError(str(error)) from None


def run_evaluate(checkpoint: str | Path, output: str | Path, *, data: DataConfig, split: str = "test",
                 compare: str | Path | None = None, cfg: EvalConfig | None = None, device: str = "auto",
                 dtype: str | None = None, limit: int | None = None, tensorboard: bool = True,
                 prompt: str | None = None, overwrite: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Evaluate `checkpoint` (and `compare`, on the same samples) into `output`; returns
    {"summary": ..., "compare_summary": ..., "comparison": ...} (the last two None without compare).

    Layout: OUT/eval.{json,md}, per_sample.csv, overlays/ for the checkpoint; with compare also
    OUT/compare/ (the same for the second checkpoint) and OUT/comparison.{json,md,csv}, where
    'before' is the checkpoint and 'after' the compared one; OUT/tb holds the TensorBoard logs. A non-empty
    OUT is refused unless `overwrite`, which empties it first (two models' TensorBoard files never mix).
    """
    cfg = cfg or EvalConfig()
    try:
        cfg.validate()
    except ValueError as error:
        raise InputError(str(error)) from None
    if Path(output).exists() and not Path(output).is_dir():
        raise InputError(f"--output-dir {output}: exists and is not a directory")
    target = resolve_device(device)
    # Check both model directories before the (long) first evaluation starts.
    resolve_model_dir(checkpoint)
    if compare is not None:
        resolve_model_dir(compare, "--compare")
    check_prompt(prompt)
    samples = load_eval_samples(data, split, limit)
    out = _prepare_output(output, overwrite)  # the inputs are known good: now the output may be replaced
    echo(f"evaluating {len(samples)} samples of the {data.format} {split} split")

    tb = TBWriter(out / "tb", enabled=tensorboard)
    try:
        model = load_checkpoint(checkpoint, device=target, dtype=dtype, prompt=prompt)
        summary = evaluate_model(model, samples, cfg, out_dir=out, tb=tb, tag="eval", title=str(checkpoint))
        echo(f"\n{checkpoint}\n{format_summary_table(summary)}\n"
             f"[SEG] rate {summary['generate']['seg_rate']:.3f}, misses {summary['generate']['misses']}; "
             f"report: {out / 'eval.md'}")
        result = {"summary": summary, "compare_summary": None, "comparison": None}
        if compare is not None:
            del model  # one model in memory at a time
            gc.collect()
            other = load_checkpoint(compare, device=target, dtype=dtype, argument="--compare", prompt=prompt)
            other_summary = evaluate_model(other, samples, cfg, out_dir=out / COMPARE_SUBDIR, tb=tb, tag="compare",
                                           title=str(compare))
            comparison = compare_summaries(summary, other_summary, tau=cfg.threshold, tolerance=cfg.stable_tolerance,
                                           before_name=str(checkpoint), after_name=str(compare),
                                           resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
            write_comparison(out, comparison)
            echo("\n" + format_comparison(comparison) + f"\nwritten: {out / 'comparison.md'}")
            result.update(compare_summary=other_summary, comparison=comparison)
    finally:
        tb.close()
    return result


def run_predict(checkpoint: str | Path, images: Sequence[str | Path], out: str | Path, *, batch_size: int = 8,
                max_new_tokens: int = 16, device: str = "auto", dtype: str | None = None,
                prompt: str | None = None, fov: bool = True, overwrite: bool = False,
                echo: Callable[[str], None] = print) -> list[Prediction]:
    """Predict `images` with the model `checkpoint` into `out` (refused when non-empty unless `overwrite`);
    says first what the model is, and restricts every mask to the photograph's field of view unless not `fov`."""
    files = [Path(p) for p in images]
    target = resolve_device(device)
    path = resolve_model_dir(checkpoint)
    check_prompt(prompt)
    check_images(files)  # before the model is loaded: a typo should not cost a model load
    out = _prepare_output(out, overwrite)
    echo(f"model {path}: {describe_model(path)}")
    model = load_checkpoint(checkpoint, device=target, dtype=dtype, prompt=prompt)
    predictions = predict_images(model, files, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 validate=False, fov=fov)
    for prediction in predictions:
        echo(format_prediction(prediction))
    misses = sum(not p.seg_emitted for p in predictions)
    echo(f"{len(predictions)} image(s) -> {out} ({misses} without [SEG])")
    return predictions
