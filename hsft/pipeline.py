"""The main command: the ordered table of stages, the resume/skip loop, and the report.

Every stage is one module under hsft/stages/ with the same entry, `run(ctx, cfg, start) -> StageResult`:
the run context (built once, below), the stage's own config, and the model directory it starts from.
Each stage reads the previous stage's output directory and writes its own; `report.json` and
`report.md` at the top of the output directory join the stages' parts. Adding a stage or a variant
is one module and one row of `STAGES` (and its name in `hsft.config.STAGE_ORDER`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from hsft.config import STAGE_ORDER, RunConfig
from hsft.data import load_splits
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.ds_config import DeepSpeedConfigError, load_ds_config
from hsft.engine.files import write_json
from hsft.engine.loop import NonFiniteTrainingError
from hsft.engine.output_lock import OutputDirInUse, hold_output_dir
from hsft.model import build_model, is_model_directory, load_model, save_model
from hsft.model.chain import make_lean
from hsft.model.checkpoint import META_FILE
from hsft.stages import (all_data, anti_curriculum, base, control, curriculum, dpo, evaluation, hsft, iterative, lora,
                         loss_weighted, mining)
from hsft.stages.training import StageResult, is_complete, model_dir


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: its name (= its output directory), its entry, the RunConfig field that
    holds its config, and whether it produces a model (then --resume skips it once complete).

    `beside` makes the row a variant of another stage (a control): it starts from the model that
    stage started from, and its model is evaluated but not handed on to the stages after it.
    """

    name: str
    run: Callable[[RunContext, object, Path | None], StageResult]
    config: str
    trains: bool
    report_key: str | None = None  # report.json key (default: the name)
    beside: str | None = None


STAGES = (
    Stage("base", base.run, "base", trains=True),
    Stage("lora", lora.run, "lora", trains=True),
    Stage("dpo", dpo.run, "dpo", trains=True),
    Stage("mining", mining.run, "mining", trains=False),
    Stage("hsft", hsft.run, "hsft", trains=True),
    Stage("control", control.run, "hsft", trains=True, beside="hsft"),
    Stage("all_data", all_data.run, "hsft", trains=True, beside="hsft"),
    Stage("curriculum", curriculum.run, "hsft", trains=True, beside="hsft"),
    Stage("anti_curriculum", anti_curriculum.run, "hsft", trains=True, beside="hsft"),
    Stage("loss_weighted", loss_weighted.run, "hsft", trains=True, beside="hsft"),
    Stage("iterative", iterative.run, "hsft", trains=True, beside="hsft"),
    Stage("eval", evaluation.run, "eval", trains=False, report_key="evaluation"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
assert tuple(STAGE_BY_NAME) == STAGE_ORDER, "hsft.config.STAGE_ORDER must list the stages of this table"
assert all(STAGE_ORDER.index(s.beside) < STAGE_ORDER.index(s.name) for s in STAGES if s.beside), \
    "a variant's row must follow the stage it sits beside"


class PipelineError(RuntimeError):
    pass


def _check_output_dir(cfg: RunConfig, out: Path) -> None:
    """Refuse to mix two runs in one stage directory: continuing needs --resume, replacing --overwrite."""
    clashing = [s for s in cfg.stages if (out / s).exists()]
    if not clashing or cfg.resume:
        return
    if not cfg.overwrite:
        raise PipelineError(f"--output-dir {out} already holds stage output ({', '.join(clashing)}); pass --resume "
                            "to continue that run, --overwrite to replace it, or choose another --output-dir")
    if distributed.is_main():
        for name in clashing:
            shutil.rmtree(out / name)
            shutil.rmtree(out / "tb" / name, ignore_errors=True)
    distributed.barrier()


def _starting_model(ctx: RunContext) -> tuple[Path | None, str]:
    """The model directory the first selected stage reads, and a label for the report."""
    cfg = ctx.cfg
    if cfg.start_model:
        start = Path(cfg.start_model)
        if not is_model_directory(start):
            raise PipelineError(f"--model {start}: not a saved hsft model directory (no {META_FILE}); pass a "
                                "stage's model/ directory")
        return start, f"--model {start}"
    first = STAGE_ORDER.index(cfg.stages[0])
    for stage in reversed(STAGES[:first]):
        if stage.trains and stage.beside is None and is_complete(ctx.stage_dir(stage.name)):
            return model_dir(ctx.stage_dir(stage.name)), f"stage {stage.name} of {ctx.out_dir}"
    if cfg.stages[0] == "base":
        return None, "embedded tiny preset"
    if cfg.model.vlm is not None:
        init = ctx.stage_dir("init")
        if distributed.is_main():
            save_model(build_model(cfg.model, seed=cfg.seed), model_dir(init))
        distributed.barrier()
        return model_dir(init), f"--vlm {cfg.model.vlm} + --sam2 {cfg.model.sam2}"
    raise PipelineError(f"stage {cfg.stages[0]!r} needs a starting model: pass --model DIR (a stage's model/ "
                        "directory), --vlm/--sam2, or include the earlier stages")


def keep_only_changes(directory: Path, base: Path) -> None:
    """Rewrite a finished stage's model directory as the tensors it changed plus a reference to `base`."""
    if distributed.is_main():
        make_lean(directory, base, load_model)
    distributed.barrier()


def _continue_global_step(ctx: RunContext, upto: str) -> None:
    """TensorBoard's step never resets: continue from the newest finished stage up to `upto`."""
    for name in reversed(STAGE_ORDER[:STAGE_ORDER.index(upto) + 1]):
        metrics = ctx.stage_dir(name) / "metrics.json"
        if metrics.is_file():
            ctx.global_step = max(ctx.global_step, json.loads(metrics.read_text()).get("global_step_end", 0))
            return


def format_report(ctx: RunContext, report: dict, results: dict[str, StageResult]) -> str:
    """report.md: the run's header, then each stage's own section (the held-out results first), the
    stages' notes, and where everything is."""
    data = report["data"]
    lines = ["# hsft run report", "", f"Output directory: `{report['output_dir']}`  ",
             f"Started from: {report['start']}  ", f"Stages: {', '.join(report['stages'])}  ",
             f"Recipe: {report['recipe'] or 'none (the configs as given)'}  ",
             f"Held-out split: {data['test']} samples ({data['format']}); training split {data['train']}, "
             f"validation {data['val']}", ""]
    ordered = sorted(results.items(), key=lambda item: item[0] != "eval")  # results lead, then pipeline order
    for _, result in ordered:
        lines += result.section
    notes = [note for result in results.values() for note in result.notes]
    if notes:
        lines += ["## Stages", ""] + notes + [""]
    lines += ["## Where things are", ""]
    for name, path in report["written"].items():
        lines.append(f"- {name}: `{path}`")
    lines += ["", f"TensorBoard: `tensorboard --logdir {Path(report['output_dir']) / 'tb'}`", ""]
    return "\n".join(lines)


def run_pipeline(cfg: RunConfig) -> dict:
    distributed.init_distributed()
    cfg.validate()
    ds_file_config = load_ds_config(cfg.deepspeed)
    out = Path(cfg.output_dir)
    lock = hold_output_dir(out)  # before anything is read or removed there
    try:
        return _run_locked(cfg, ds_file_config, out)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, ds_file_config: dict, out: Path) -> dict:
    _check_output_dir(cfg, out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    started = time.time()
    ctx = RunContext.build(cfg, ds_file_config)
    if cfg.hsft.cuda_graph and ctx.device.type != "cuda":
        raise ValueError(f"--hsft-cuda-graph: CUDA graphs need a CUDA device; this run is on {ctx.device}")
    write_json(out / "run_config.json", asdict(cfg))
    ctx.splits = load_splits(cfg.data)
    splits = ctx.splits
    if distributed.is_main():
        print(f"data: {cfg.data.format} train {len(splits.train)} / val {len(splits.val)} / held-out test "
              f"{len(splits.test)}; {distributed.world_size()} rank(s) on {ctx.device}, {ctx.precision}")
    if cfg.stages[0] != STAGE_ORDER[0]:
        _continue_global_step(ctx, STAGE_ORDER[STAGE_ORDER.index(cfg.stages[0]) - 1])
    current, start_label = _starting_model(ctx)
    if current is not None and cfg.eval.evaluate_start:
        ctx.models.append(("start", current))
    results: dict[str, StageResult] = {}
    written: dict[str, str] = {}

    starts: dict[str, Path | None] = {}  # the model each stage started from
    for stage in (STAGE_BY_NAME[name] for name in cfg.stages):
        stage_dir = ctx.stage_dir(stage.name)
        start = starts.get(stage.beside, current) if stage.beside else current
        starts[stage.name] = start
        if stage.trains and cfg.resume and is_complete(stage_dir):
            if distributed.is_main():
                print(f"[{stage.name}] already complete in {stage_dir}; skipping (--resume)")
            result = StageResult(model_dir=model_dir(stage_dir))
        else:
            result = stage.run(ctx, getattr(cfg, stage.config), start)
            results[stage.name] = result
            if stage.trains and stage.name != "base" and not cfg.standalone and current is not None:
                keep_only_changes(result.model_dir, current)
        _continue_global_step(ctx, stage.name)
        written.update(result.written)
        if result.model_dir is not None:
            written[f"{stage.name} model"] = str(result.model_dir)
            if (stage.name, result.model_dir) not in ctx.models:
                ctx.models.append((stage.name, result.model_dir))
                ctx.started_from[stage.name] = start
                if stage.beside:
                    ctx.variants[stage.name] = stage.beside
            if stage.beside is None:
                current = result.model_dir

    report = {"output_dir": str(out), "start": start_label, "stages": list(cfg.stages), "recipe": cfg.recipe,
              "data": {"format": cfg.data.format, "train": len(splits.train), "val": len(splits.val),
                       "test": len(splits.test)},
              "seed": cfg.seed, "world_size": distributed.world_size(), "device": str(ctx.device),
              "precision": ctx.precision}
    for name, result in results.items():
        report[STAGE_BY_NAME[name].report_key or name] = result.summary
    written["TensorBoard"] = str(out / "tb")
    report["written"] = written
    report["seconds"] = time.time() - started
    write_json(out / "report.json", report)
    if distributed.is_main():
        text = format_report(ctx, report, results)
        (out / "report.md").write_text(text)
        print("\n" + text)
    distributed.barrier()
    return report


def exit_code(prog: str, action: Callable[[], object]) -> int:
    """Run `action` as a command named `prog`: 0 when it finishes; bad input ends with one clear line and
    exit code 2, a run stopped by non-finite values with 3 (HSFT_DEBUG=1 shows the traceback)."""
    try:
        action()
    except NonFiniteTrainingError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    except (PipelineError, DeepSpeedConfigError, OutputDirInUse, ValueError, FileNotFoundError) as err:
        if os.environ.get("HSFT_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(cfg: RunConfig) -> int:
    """Run the pipeline; bad input ends with one clear line (HSFT_DEBUG=1 shows the traceback)."""
    return exit_code("hsft", lambda: run_pipeline(cfg))
