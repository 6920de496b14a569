"""Aggregates the per-sample records into the evaluation summary (a JSON-able dict).

Keys the pipeline relies on: summary["n"], summary["paths"][path]["dice" | "iou"] (per-image
means), summary["generate"]["seg_rate" | "misses"], summary["discrepancy"].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from hsft import metrics
from hsft.eval.config import EvalConfig
from hsft.eval.records import METRIC_NAMES, PATHS, TEACHER_FORCED, SampleRecord
from hsft.eval.statistics import describe, label_flips, paired_bootstrap

__all__ = ["build_summary"]

# How many distinct generated answers the summary lists (most frequent first).
TOP_TEXTS = 5


def _path_summary(records: Sequence[SampleRecord], path: str) -> dict:
    scores = [r.scores[path] for r in records]
    out: dict = {name: describe([s.metric(name) for s in scores])["mean"] for name in METRIC_NAMES}
    out["dice_stats"] = describe([s.dice for s in scores])
    counts = torch.tensor([[s.tp, s.fp, s.fn, s.tn] for s in scores], dtype=torch.int64)
    # Pooled over all pixels of the split (the other common convention), for comparison with papers.
    out["pooled"] = {name: float(value) for name, value in metrics.pooled_metrics(counts).items()}
    return out


def _generate_summary(records: Sequence[SampleRecord]) -> dict:
    n = len(records)
    emitted = sum(r.seg_emitted for r in records)
    texts = Counter(r.text for r in records)
    return {
        "seg_rate": emitted / n,
        "emitted": emitted,
        "misses": n - emitted,
        "miss_ids": [r.id for r in records if not r.seg_emitted],
        "multi_seg": sum(r.num_seg > 1 for r in records),
        "texts": [{"text": text, "count": count} for text, count in texts.most_common(TOP_TEXTS)],
        "distinct_texts": len(texts),
    }


def _discrepancy(records: Sequence[SampleRecord], cfg: EvalConfig) -> dict:
    ids = [r.id for r in records]
    generate_dice = [r.dice("generate") for r in records]
    out: dict = {"reference": "generate", "tau": cfg.threshold, "pairs": {}}
    for path in TEACHER_FORCED:
        path_dice = [r.dice(path) for r in records]
        out["pairs"][path] = {
            # Cosines only where generate emitted a [SEG]: a miss has no state to compare.
            "cosine_hidden": describe([r.cosine_hidden[path] for r in records]),
            "cosine_embedding": describe([r.cosine_embedding[path] for r in records]),
            "mask_agreement_dice": describe([r.agreement_dice[path] for r in records]),
            "dice_difference": paired_bootstrap(path_dice, generate_dice, resamples=cfg.bootstrap_resamples,
                                                seed=cfg.bootstrap_seed),
            "flips": [
                {"id": f["id"], path: f["dice_first"], "generate": f["dice_second"], "from": f["first"],
                 "to": f["second"]}
                for f in label_flips(ids, path_dice, generate_dice, cfg.threshold)
            ],
        }
    return out


def build_summary(records: Sequence[SampleRecord], cfg: EvalConfig, *, tag: str, step: int,
                  title: str | None = None) -> dict:
    if not records:
        raise ValueError("build_summary: no records")
    return {
        "tag": tag,
        "title": title or tag,
        "step": step,
        "n": len(records),
        "with_fov": sum(r.has_fov for r in records),
        "settings": {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "tau": cfg.threshold,
                     "threshold": "logit > 0 after bilinear upsampling to the original size",
                     "bootstrap_resamples": cfg.bootstrap_resamples, "bootstrap_seed": cfg.bootstrap_seed},
        "paths": {path: _path_summary(records, path) for path in PATHS},
        "generate": _generate_summary(records),
        "discrepancy": _discrepancy(records, cfg),
        "samples": [r.to_json() for r in records],
    }
