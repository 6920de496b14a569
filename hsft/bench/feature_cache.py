"""HSFT epoch time with and without the frozen-feature cache.

With the vision encoder and the LLM frozen, the cache computes each sample's SAM2 features and [SEG]
hidden state once (during the first epoch) and runs only text_hidden_fcs + the mask decoder after.
The first epoch pays for filling the cache, so the speed-up is reported per epoch and for epochs 2+.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hsft.config import HSFTStageConfig, RunConfig, TrainConfig
from hsft.data.synthetic import make_fundus
from hsft.engine.context import RunContext
from hsft.engine.ds_config import load_ds_config
from hsft.engine.loop import train
from hsft.engine.tensorboard import TBWriter
from hsft.model import ModelConfig, build_model, load_model
from hsft.stages.hsft import HSFTTask
from hsft.stages.training import Validation


def run(*, model_dir: str | None, preset: str, samples: int, size: int, epochs: int, precision: str,
        ds_config: str, out: Path) -> dict:
    data = [make_fundus(seed=10_000 + i, size=size) for i in range(samples)]
    rows = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = load_model(model_dir) if model_dir else build_model(ModelConfig(preset=preset))
        cfg = HSFTStageConfig(train=TrainConfig(epochs=epochs, micro_batch=1, grad_accum=2, lr=1e-5),
                              cache_features=cache)
        task = HSFTTask(model, data, cfg, Validation([], 1, 1))
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext.build(RunConfig(output_dir=tmp, seed=0, precision=precision), load_ds_config(ds_config))
            start = time.perf_counter()
            result = train(task, cfg.train, ctx, stage_dir=Path(tmp), tb=TBWriter(None))
            total = time.perf_counter() - start
        epoch_seconds = [m["train_seconds"] for m in result.epoch_metrics]
        rows["cached" if cache else "uncached"] = {"epoch_seconds": epoch_seconds, "total_seconds": total,
                                                    "losses": result.losses}
    later = lambda key: statistics.median(rows[key]["epoch_seconds"][1:] or rows[key]["epoch_seconds"])  # noqa: E731
    summary = {
        "benchmark": "hsft_feature_cache",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "model": model_dir or preset,
        "samples": samples,
        "image_size": size,
        "epochs": epochs,
        "uncached": rows["uncached"],
        "cached": rows["cached"],
        "speedup_epoch1": rows["uncached"]["epoch_seconds"][0] / rows["cached"]["epoch_seconds"][0],
        "speedup_later_epochs_median": later("uncached") / later("cached"),
        "same_losses": rows["uncached"]["losses"] == rows["cached"]["losses"],
        "date": time.strftime("%Y-%m-%d"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cache.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"HSFT epoch seconds, {summary['samples']} samples at {summary['image_size']} px, "
             f"{summary['precision']}, {summary['threads']} threads",
             "| epoch | uncached s | cached s | speed-up |", "|---:|---:|---:|---:|"]
    for i, (u, c) in enumerate(zip(summary["uncached"]["epoch_seconds"], summary["cached"]["epoch_seconds"])):
        lines.append(f"| {i + 1} | {u:.2f} | {c:.2f} | {u / c:.2f}x |")
    lines.append(f"median speed-up over epochs 2+: {summary['speedup_later_epochs_median']:.2f}x; "
                 f"identical losses: {summary['same_losses']}")
    return "\n".join(lines)
