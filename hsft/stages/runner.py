"""What every training stage does around the loop: TensorBoard, the loop itself, the export of the
trained weights, and the stage directory's metrics.json.

A stage directory holds:
    model/                  the whole composite (Sa2VAModel.save_pretrained), what the next stage reads
    trainable.safetensors   only the weights this stage trained, in float32
    checkpoints/            DeepSpeed checkpoints (COMPLETE names the newest usable one)
    metrics.json            losses, epoch metrics, timing
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hsft.config import TrainConfig
from hsft.engine import distributed
from hsft.engine.ds_config import precision_of
from hsft.engine.loop import TrainTask, export_fp32_state, train, write_json
from hsft.engine.tensorboard import TBWriter
from hsft.model.checkpoint import is_model_directory


@dataclass
class StageContext:
    """Run-wide state handed from stage to stage."""

    out_dir: Path
    ds_base: dict
    seed: int
    precision: str | None
    resume: bool
    global_step: int = 0
    results: dict = field(default_factory=dict)
    keep_checkpoints: int = 1

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def tb(self, name: str) -> TBWriter:
        return TBWriter(self.out_dir / "tb" / name, enabled=distributed.is_main())


def training_dtype(ctx: StageContext) -> torch.dtype:
    """The dtype DeepSpeed trains in under this run's config and --precision override."""
    return torch.bfloat16 if (ctx.precision or precision_of(ctx.ds_base)) == "bf16" else torch.float32


def model_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "model"


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / "metrics.json").is_file() and is_model_directory(model_dir(stage_dir))


def trained_weights(engine, ckpt_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The trainable parameters' float32 values, keyed as in the Sa2VA model (module prefix stripped)."""
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    state = export_fp32_state(engine, ckpt_dir)
    return {name[len(prefix):]: state[name].contiguous() for name in sorted(trainable)}


def run_training_stage(ctx: StageContext, task: TrainTask, cfg: TrainConfig, *, load_input_model,
                       prefix: str = "model.", export: Callable[[Any, Path], None] | None = None) -> dict:
    """Train `task`, then write the stage directory. `load_input_model()` returns a fresh float32 copy of
    the model this stage started from: the export is that model plus the trained weights, so frozen
    weights are saved exactly as they came in (not rounded through the bf16 training copy).

    `export(model, stage_dir)`, when given, writes `model/` (and whatever else the stage produces)
    instead of the plain `model.save_pretrained`: the LoRA stage uses it to write its adapter
    directory and the merged model."""
    stage_dir = ctx.stage_dir(task.name)
    tb = ctx.tb(task.name)
    result = train(task, cfg, ctx.ds_base, stage_dir=stage_dir, tb=tb, seed=ctx.seed, step_offset=ctx.global_step,
                   resume=ctx.resume, precision=ctx.precision, keep_checkpoints=ctx.keep_checkpoints)
    weights = trained_weights(result.engine, stage_dir / "checkpoints", prefix) if distributed.is_main() else {}
    if distributed.is_main():
        model = load_input_model()
        missing = set(weights) - set(dict(model.named_parameters()))
        if missing:
            raise RuntimeError(f"stage {task.name}: trained weights not found in the model: {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)
        if export is None:
            model.save_pretrained(model_dir(stage_dir))
        else:
            export(model, stage_dir)
        save_file(weights, str(stage_dir / "trainable.safetensors"))
        summary = {
            "stage": task.name,
            "samples": len(task),
            "optimizer_steps": result.optimizer_steps,
            "skipped_steps": result.skipped_steps,
            "skipped": result.skipped,  # step, reason and sample ids of every skipped step
            "global_step_end": result.global_step,
            "losses": result.losses,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "epochs": result.epoch_metrics,
            "seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "trainable_parameters": sum(w.numel() for w in weights.values()),
            "train_config": cfg.__dict__,
        }
        write_json(stage_dir / "metrics.json", summary)
    tb.close()
    distributed.barrier()
    ctx.global_step = result.global_step
    return {"optimizer_steps": result.optimizer_steps, "losses": result.losses, "epochs": result.epoch_metrics,
            "seconds": result.seconds}
