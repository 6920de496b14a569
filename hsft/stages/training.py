"""What every stage shares: the `StageResult` it returns, and what a training stage does around the
loop (the export of the trained weights, the stage directory, a stage that passes its input on).

A training stage's directory holds:
    model/                  the whole composite (hsft.model.save_model), what the next stage reads
    trainable.safetensors   only the weights this stage trained, in float32
    checkpoints/            DeepSpeed checkpoints (COMPLETE names the newest usable one)
    metrics.json            losses, epoch metrics, timing
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from hsft.config import TrainConfig
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.files import write_json
from hsft.engine.loop import TrainResult, TrainTask, train
from hsft.engine.tensorboard import TBWriter
from hsft.eval.inference import validation_metrics
from hsft.model import Sa2VAModel, is_model_directory, save_model
from hsft.model.chain import write_lean

__all__ = ["StageResult", "model_dir", "is_complete", "train_stage", "pass_model_on", "Validation"]

# Every training objective wraps the Sa2VA model as its `model` attribute.
MODEL_PREFIX = "model."


@dataclass
class StageResult:
    """What a stage hands back to the pipeline.

    model_dir: the model after this stage (what the next stage reads); None for a stage that trains
    nothing (mining, eval), after which the previous model goes on.
    summary: the stage's facts (steps, losses before and after, what it trained, its evidence): its entry
    in report.json, from which hsft.stages.report renders its part of report.md. written: what it wrote,
    by label. global_step: the run-wide step after this stage; None for a stage that trains nothing.
    """

    model_dir: Path | None = None
    summary: dict | list = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None


def model_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "model"


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / "metrics.json").is_file() and is_model_directory(model_dir(stage_dir))


@dataclass
class Validation:
    """The epoch metrics of the supervised stages: the generate path's Dice and [SEG] rate on the
    validation split, as the final evaluation measures them."""

    samples: list
    batch_size: int
    max_new_tokens: int

    @classmethod
    def of(cls, ctx: RunContext) -> Validation:
        return cls(ctx.splits.val, ctx.inference.batch_size, ctx.inference.max_new_tokens)

    def __call__(self, model) -> dict[str, float]:
        return validation_metrics(model, self.samples, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)


def train_stage(ctx: RunContext, task: TrainTask, cfg: TrainConfig, *, load_input_model: Callable[[], Sa2VAModel],
                export: Callable[[Sa2VAModel, Path], None] | None = None, stage_dir: Path | None = None,
                tb: TBWriter | None = None, input_dir: Path | None = None) -> TrainResult:
    """Train `task`, then write the stage directory (default `ctx.stage_dir(task.name)`).

    `load_input_model()` returns a fresh float32 copy of the model this stage started from: the export
    is that model plus the trained weights, so frozen weights are saved exactly as they came in (not
    rounded through the bf16 training copy). `export(model, stage_dir)`, when given, writes `model/`
    (and whatever else the stage produces) instead of the plain save: the LoRA stage writes its
    adapter directory and the merged model with it. The result's `global_step` is the run-wide step
    after this stage (the pipeline's count goes on from it).

    `input_dir`, the directory `load_input_model` reads, lets a stage without its own `export` write
    `model/` as its trained tensors over that directory (a lean directory, hsft.model.chain) without
    loading the input model at all, unless the run writes self-contained directories (--standalone).
    At real size this is the difference between one model in memory and two: the float32 copy would
    sit beside the training copy (4 GB each at Sa2VA-1B).
    """
    stage_dir = Path(stage_dir or ctx.stage_dir(task.name))
    own_tb = tb is None
    tb = ctx.tb(task.name) if own_tb else tb
    result = train(task, cfg, ctx, stage_dir=stage_dir, tb=tb)
    if distributed.is_main():
        weights = {name.removeprefix(MODEL_PREFIX): value for name, value in result.weights.items()}
        lean = export is None and input_dir is not None and not ctx.cfg.standalone
        if not (lean and write_lean(model_dir(stage_dir), input_dir, weights)):
            model = load_input_model()
            missing = set(weights) - set(dict(model.named_parameters()))
            if missing:
                raise RuntimeError(f"stage {task.name}: trained weights not found in the model: {sorted(missing)[:5]}")
            model.load_state_dict(weights, strict=False)
            (export or (lambda m, d: save_model(m, model_dir(d))))(model, stage_dir)
            del model
        save_file(weights, str(stage_dir / "trainable.safetensors"))
        write_json(stage_dir / "metrics.json", {
            "stage": task.name,
            "samples": len(task),
            "optimizer_steps": result.optimizer_steps,
            "skipped_steps": result.skipped_steps,
            "skipped": result.skipped,  # step, reason and sample ids of every skipped step
            "global_step_end": result.global_step,
            "losses": result.losses,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "grad_norms": result.grad_norms,
            "epochs": result.epoch_metrics,
            "seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "trainable_parameters": sum(w.numel() for w in weights.values()),
            "train_config": cfg.__dict__,
        })
    if own_tb:
        tb.close()
    distributed.barrier()
    return result


def recorded_step(stage_dir: Path) -> int | None:
    """The run-wide step a finished training stage ended at, as its metrics.json records it."""
    path = Path(stage_dir) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")).get("global_step_end") if path.is_file() else None


def pass_model_on(ctx: RunContext, stage: str, start: Path, reason: str, summary: dict) -> StageResult:
    """A training stage with nothing to train on: copy its input model as its output, so the later
    stages and the evaluation still run, and say why."""
    stage_dir = ctx.stage_dir(stage)
    if distributed.is_main():
        print(f"[{stage}] {reason}")
        if model_dir(stage_dir).exists():
            shutil.rmtree(model_dir(stage_dir))
        shutil.copytree(start, model_dir(stage_dir))
        write_json(stage_dir / "metrics.json", {"stage": stage, "skipped": True, "reason": reason, "samples": 0,
                                                "optimizer_steps": 0, "global_step_end": ctx.global_step, **summary})
    distributed.barrier()
    return StageResult(model_dir=model_dir(stage_dir), summary={**summary, "skipped": True, "reason": reason},
                       global_step=ctx.global_step)
