"""Evaluation of both [SEG] paths and the training-inference discrepancy; prediction on image files.

    from hsft.eval import evaluate_model
    summary = evaluate_model(model, samples, EvalConfig(), out_dir=Path("out"), tb=tb, tag="eval")
    summary["paths"]["generate"]["dice"], summary["generate"]["seg_rate"], summary["discrepancy"]

Modules: seg_paths (running the forward / prompt / generate [SEG] paths), inference (the one sharded generate-and-score pass), scoring (metrics at the original
resolution through hsft.ops + hsft.metrics), summary + statistics (aggregates, paired bootstrap,
flips), report (eval.json / eval.md / per_sample.csv), overlays (pictures), compare (checkpoint
comparison), predict (masks for image files), cli (what launch/evaluate.py and launch/predict.py run).
"""

from hsft.eval.compare import compare_summaries, format_comparison, write_comparison
from hsft.eval.errors import InputError
from hsft.eval.evaluator import evaluate_model
from hsft.eval.predict import Prediction, predict_images
from hsft.eval.records import PATHS, PathScores, SampleRecord
from hsft.eval.statistics import paired_bootstrap

__all__ = [
    "evaluate_model",
    "predict_images",
    "Prediction",
    "compare_summaries",
    "format_comparison",
    "write_comparison",
    "paired_bootstrap",
    "InputError",
    "PATHS",
    "PathScores",
    "SampleRecord",
]
