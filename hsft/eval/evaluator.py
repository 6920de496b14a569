"""`evaluate_model`: the three [SEG] paths over a list of samples, sharded over ranks; the summary,
the report files, overlay pictures and TensorBoard logs (rank 0)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hsft.eval.config import EvalConfig
from hsft.data import Sample
from hsft.data.batches import chunks
from hsft.model.modes import eval_mode
from hsft.engine import distributed
from hsft.engine.tensorboard import TBWriter
from hsft.eval.inference import sharded_map
from hsft.eval.overlays import ERROR_LEGEND, Panel, compose, error_map, save_png, tint
from hsft.eval.seg_paths import measure_batch, run_paths
from hsft.eval.records import PATHS, SampleRecord
from hsft.eval.report import format_summary_table, write_report
from hsft.eval.scoring import binary_mask
from hsft.eval.summary import build_summary

__all__ = ["evaluate_model", "render_overlays", "unwrap_model", "OVERLAY_DIR"]

OVERLAY_DIR = "overlays"
# TensorBoard images wider than this are shrunk (the PNG files keep full resolution).
TB_MAX_WIDTH = 2048


def unwrap_model(model):
    """The Sa2VA model inside a DeepSpeed engine or a training objective wrapper."""
    seen = model
    while not hasattr(seen, "generate_seg"):
        inner = getattr(seen, "module", None)
        if inner is None:
            inner = getattr(seen, "model", None)
        if inner is None:
            raise TypeError(f"model: {type(model).__name__} is not a Sa2VA model (no generate_seg) and wraps none")
        seen = inner
    return seen


def _check_samples(samples: Sequence[Sample]) -> None:
    if len(samples) == 0:
        raise ValueError("samples: nothing to evaluate (the list is empty)")
    duplicates = [sample_id for sample_id, count in Counter(s.id for s in samples).items() if count > 1]
    if duplicates:
        # Ids key the per-sample tables, the flip list and checkpoint comparisons.
        raise ValueError(f"samples: ids must be unique; repeated: {duplicates[:10]}")


def _file_safe(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("_") or "sample"


def _overlay_selection(records: Sequence[SampleRecord], cfg: EvalConfig) -> list[tuple[str, str, int]]:
    """(file stem, TensorBoard name, sample index): the worst k by generate Dice, then the first k
    samples (a fixed set, so the same pictures can be compared across stages)."""
    worst = sorted(records, key=lambda r: (r.dice("generate"), r.index))[:cfg.overlays]
    fixed = sorted(records, key=lambda r: r.index)[:cfg.fixed_overlays]
    chosen = [(f"worst_{k + 1:02d}_{_file_safe(r.id)}", f"worst_{k + 1:02d}", r.index) for k, r in enumerate(worst)]
    # The position keeps file names distinct even when two ids reduce to the same safe name.
    chosen += [(f"fixed_{k + 1:02d}_{_file_safe(r.id)}", f"fixed/{r.id}", r.index) for k, r in enumerate(fixed)]
    return chosen


def _clear_old_overlays(directory: Path) -> None:
    # A previous evaluation into the same directory may have picked other worst samples; its
    # pictures would sit next to this run's and be mistaken for them.
    for pattern in ("worst_*.png", "fixed_*.png"):
        for stale in directory.glob(pattern):
            stale.unlink()


def _caption(path: str, record: SampleRecord) -> str:
    if path == "generate" and not record.seg_emitted:
        return "generate: no [SEG]"
    return f"{path}: Dice {record.dice(path):.3f}"


def render_overlays(model, samples: Sequence[Sample], selection: Sequence[tuple[str, str, int]], cfg: EvalConfig,
                    logits_processor=None) -> dict[int, np.ndarray]:
    """Overlay picture per selected sample index: image | ground truth | generate | forward.

    The selected samples are run again (a handful, on this rank only) instead of keeping every
    sample's logits through the whole evaluation.
    """
    wanted = sorted({index for _, _, index in selection})
    pictures: dict[int, np.ndarray] = {}
    for chunk in chunks(wanted, cfg.batch_size):
        batch = [samples[i] for i in chunk]
        outputs = run_paths(model, [s.image for s in batch], max_new_tokens=cfg.max_new_tokens,
                            logits_processor=logits_processor)
        for row, (sample, record) in enumerate(zip(batch, measure_batch(outputs, batch, chunk))):
            panels = [Panel("image", sample.image),
                      Panel("ground truth", tint(sample.image, sample.mask, fov=sample.fov))]
            for path in ("generate", "forward"):
                prediction = binary_mask(outputs.mask_logits[path][row], sample.size).cpu().numpy()
                panels.append(Panel(_caption(path, record), error_map(sample.image, prediction, sample.mask,
                                                                      sample.fov)))
            pictures[record.index] = compose(panels, sample.id, ERROR_LEGEND)
    return pictures


def _for_tensorboard(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    if width <= TB_MAX_WIDTH:
        return pixels
    size = (TB_MAX_WIDTH, max(1, round(height * TB_MAX_WIDTH / width)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


def _log_tensorboard(tb: TBWriter, tag: str, step: int, summary: dict,
                     overlays: list[tuple[str, np.ndarray]]) -> None:
    scalars = {}
    for path in PATHS:
        scalars[f"{tag}/{path}/dice"] = summary["paths"][path]["dice"]
        scalars[f"{tag}/{path}/iou"] = summary["paths"][path]["iou"]
        tb.histogram(f"{tag}/dice_histogram/{path}", [row["scores"][path]["dice"] for row in summary["samples"]], step)
    scalars[f"{tag}/generate/seg_rate"] = summary["generate"]["seg_rate"]
    forward = summary["discrepancy"]["pairs"]["forward"]
    if forward["cosine_hidden"]["mean"] is not None:
        scalars[f"{tag}/discrepancy/cosine_hidden_mean"] = forward["cosine_hidden"]["mean"]
    scalars[f"{tag}/discrepancy/dice_generate_minus_forward"] = forward["dice_difference"]["mean"]
    tb.scalars(scalars, step)
    tb.text(f"{tag}/summary", format_summary_table(summary), step)
    for name, pixels in overlays:
        tb.image(f"{tag}/overlay/{name}", _for_tensorboard(pixels), step)
    tb.flush()


def evaluate_model(model, samples: list[Sample], cfg: EvalConfig, *, out_dir: Path | None, tb: TBWriter | None = None,
                   step: int = 0, tag: str = "eval", logits_processor=None, title: str | None = None) -> dict:
    """Evaluate the forward, [SEG]-in-prompt and generate paths on `samples`; see hsft.eval.summary for
    the returned summary (identical on every rank).

    Samples are sharded over ranks and the records gathered; rank 0 draws the overlays and writes
    `out_dir/eval.json`, `eval.md`, `per_sample.csv` and `overlays/*.png` (when out_dir is given)
    and logs to `tb` under `{tag}/...`. `logits_processor` is passed to generation (a hook for
    constrained decoding and for tests). `title` heads eval.md (default: the tag).
    """
    cfg.validate()
    _check_samples(samples)
    net = unwrap_model(model)
    with eval_mode(net):
        def run_batch(batch: list[Sample], indices: list[int]) -> list[SampleRecord]:
            outputs = run_paths(net, [s.image for s in batch], max_new_tokens=cfg.max_new_tokens,
                                logits_processor=logits_processor)
            return measure_batch(outputs, batch, indices)

        records = sharded_map(samples, cfg.batch_size, run_batch, desc=tag)
        summary = build_summary(records, cfg, tag=tag, step=step, title=title)
        draw = distributed.is_main() and (out_dir is not None or (tb is not None and tb.enabled))
        if draw:
            selection = _overlay_selection(records, cfg)
            pictures = render_overlays(net, samples, selection, cfg, logits_processor) if selection else {}
            overlays = [(stem, tb_name, pictures[index]) for stem, tb_name, index in selection]
            files = []
            if out_dir is not None:
                _clear_old_overlays(Path(out_dir) / OVERLAY_DIR)
                for stem, _, pixels in overlays:
                    save_png(pixels, Path(out_dir) / OVERLAY_DIR / f"{stem}.png")
                    files.append(f"{stem}.png")
                write_report(Path(out_dir), summary, files)
            if tb is not None and tb.enabled:
                _log_tensorboard(tb, tag, step, summary, [(name, pixels) for _, name, pixels in overlays])
    return summary
