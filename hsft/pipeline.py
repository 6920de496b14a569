"""The main command: the ordered table of stages, the resume/skip loop, and the report.

Every stage is one module under hsft/stages/ with the same entry, `run(ctx, cfg, start) -> StageResult`:
the run context (built once, below), the stage's own config, and the model directory it starts from.
Each stage reads the previous stage's output directory and writes its own, and returns its facts
(`StageResult`); `report.json` at the top of the output directory joins them, and `report.md` is rendered
from them by hsft.stages.report. Adding a stage or a variant
is one module and one row of `STAGES` (and its name in `hsft.config.STAGE_ORDER`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hsft.config import STAGE_ORDER, RunConfig
from hsft.data import load_splits
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.ds_config import load_ds_config
from hsft.engine.files import write_json
from hsft.engine.output_lock import hold_output_dir
from hsft.engine.resources import measure
from hsft.memory_plan import format_plan, plan_for_run
from hsft.model import build_model, is_model_directory, load_model, save_model
from hsft.engine.verbosity import set_verbosity
from hsft.errors import UserError, run_command
from hsft.model.chain import make_lean
from hsft.model.directory import resolve_model_dir, write_training_record
from hsft.stages import base, dpo, evaluation, hsft, iterative, lora, mining, unet, variants
from hsft.stages.evaluation import RunModel
from hsft.stages.report import console_summary, format_report, stage_notes
from hsft.stages.training import StageResult, is_complete, model_dir, recorded_step


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: its name (= its output directory), its entry, the RunConfig field that
    holds its config, and whether it produces a model (then --resume skips it once complete).

    `beside` makes the row a variant of another stage (a control): it starts from the model that
    stage started from, and its model is evaluated but not handed on to the stages after it.
    `inputs`: what else the stage is handed, by keyword: "models" (the run's models so far, a list of
    RunModel) or the name of another RunConfig field whose settings it needs (the iterative stage mines
    with mining's settings); a stage reads no other stage's config from the run context.
    """

    name: str
    run: Callable[[RunContext, object, Path | None], StageResult]
    config: str
    trains: bool
    report_key: str | None = None  # report.json key (default: the name)
    beside: str | None = None
    inputs: tuple[str, ...] = ()


STAGES = (
    Stage("base", base.run, "base", trains=True),
    Stage("lora", lora.run, "lora", trains=True),
    Stage("dpo", dpo.run, "dpo", trains=True),
    Stage("mining", mining.run, "mining", trains=False),
    Stage("hsft", hsft.run, "hsft", trains=True),
    Stage("control", variants.control, "hsft", trains=True, beside="hsft"),
    Stage("all_data", variants.all_data, "hsft", trains=True, beside="hsft"),
    Stage("curriculum", variants.curriculum, "hsft", trains=True, beside="hsft"),
    Stage("anti_curriculum", variants.anti_curriculum, "hsft", trains=True, beside="hsft"),
    Stage("loss_weighted", variants.loss_weighted, "hsft", trains=True, beside="hsft"),
    Stage("iterative", iterative.run, "hsft", trains=True, beside="hsft", inputs=("mining",)),
    Stage("easy_control", variants.easy_control, "hsft", trains=True, beside="hsft"),
    Stage("unet", unet.run, "unet", trains=False),
    Stage("eval", evaluation.run, "eval", trains=False, report_key="evaluation", inputs=("models", "mining")),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
assert tuple(STAGE_BY_NAME) == STAGE_ORDER, "hsft.config.STAGE_ORDER must list the stages of this table"
assert all(STAGE_ORDER.index(s.beside) < STAGE_ORDER.index(s.name) for s in STAGES if s.beside), \
    "a variant's row must follow the stage it sits beside"


class PipelineError(UserError):
    pass


RUN_CONFIG_FILE = "run_config.json"
# The memory plan and each finished stage's wall time and peak memory (also in report.json at the end).
RESOURCES_FILE = "resources.json"
# A stage's StageResult, kept in its directory so a resumed run's report holds every stage.
RESULT_FILE = "stage_result.json"
# Settings that do not change what a run computes: a resumed run may give them differently.
RESUME_NEUTRAL = {"output_dir", "resume", "overwrite", "keep_checkpoints", "stages", "verbose", "base.cache_dir"}
# How a stage's batch is laid over the ranks may change on resume, as the rank count may (e.g. twice the
# micro-batch on half the ranks keeps the global batch); the loop restores the state and says what changes.
RESUME_LAYOUT = (".micro_batch", ".grad_accum")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def settings_that_differ(cfg: RunConfig, saved: dict) -> list[str]:
    """The settings (dotted field names, with the run's and the given value) in which `cfg` differs from a
    run's saved run_config.json, leaving out those that do not change results (RESUME_NEUTRAL). A field the
    saved file lacks (written by an older hsft) is not compared."""
    now = _flatten(json.loads(json.dumps(asdict(cfg))))
    before = _flatten(saved)
    return [f"{name} (run: {before[name]!r}, now: {value!r})" for name, value in now.items()
            if name not in RESUME_NEUTRAL and not name.endswith(RESUME_LAYOUT) and name in before
            and before[name] != value]


def check_same_run(cfg: RunConfig, out: Path) -> None:
    """--resume continues the run in `out` only with its own settings: refuse, before anything is written,
    naming every setting that differs."""
    path = out / RUN_CONFIG_FILE
    if not cfg.resume or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err}); pass --overwrite to replace the run") from None
    differ = settings_that_differ(cfg, saved)
    if differ:
        raise PipelineError(f"--resume: {path} was written with other settings: {'; '.join(differ)}. Give the "
                            "run's own settings to continue it, --overwrite to replace it, or another --output-dir")


def save_stage_result(stage_dir: Path, result: StageResult) -> None:
    payload = {f.name: getattr(result, f.name) for f in fields(StageResult)}
    payload["model_dir"] = None if result.model_dir is None else str(result.model_dir)
    write_json(stage_dir / RESULT_FILE, payload)


def load_stage_result(stage_dir: Path) -> StageResult | None:
    """The StageResult a finished stage left in its directory, or None."""
    path = stage_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # written atomically, so only a hand-edited file: the stage runs again
    known = {f.name for f in fields(StageResult)}
    result = StageResult(**{k: v for k, v in payload.items() if k in known})
    if result.model_dir is not None:
        result.model_dir = Path(result.model_dir)
    return result


def _finished(stage: Stage, stage_dir: Path) -> StageResult | None:
    """What a finished stage returned, when --resume may skip it: a training stage whose model and metrics
    are complete, or a stage that trains nothing whose result was saved."""
    saved = load_stage_result(stage_dir)
    if not stage.trains:
        return saved
    if not is_complete(stage_dir):
        return None
    if saved is None or saved.model_dir is None:
        saved = StageResult(model_dir=model_dir(stage_dir))
    if saved.global_step is None:  # a result saved before it recorded the step
        saved.global_step = recorded_step(stage_dir)
    return saved


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
        start = resolve_model_dir(cfg.start_model, "--model")
        return start, f"--model {start}"
    first = STAGE_ORDER.index(cfg.stages[0])
    for stage in reversed(STAGES[:first]):
        if stage.trains and stage.beside is None and is_complete(ctx.stage_dir(stage.name)):
            return model_dir(ctx.stage_dir(stage.name)), f"stage {stage.name} of {ctx.out_dir}"
    if cfg.stages[0] == "base":
        return None, "embedded tiny preset"
    if cfg.model.vlm is not None:
        init = ctx.stage_dir("init")
        if distributed.is_main() and not (cfg.resume and is_model_directory(model_dir(init))):
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


def _step_before(ctx: RunContext, first: str) -> int:
    """The run-wide step the stage `first` starts at: TensorBoard's step never resets, so a run that starts
    later in the table continues from the newest finished stage before it."""
    for name in reversed(STAGE_ORDER[:STAGE_ORDER.index(first)]):
        saved = load_stage_result(ctx.stage_dir(name))
        step = saved.global_step if saved is not None and saved.global_step is not None else None
        step = step if step is not None else recorded_step(ctx.stage_dir(name))
        if step is not None:
            return step
    return 0


def run_pipeline(cfg: RunConfig) -> dict:
    set_verbosity(cfg.verbose)
    distributed.init_distributed()
    cfg.validate()
    ds_file_config = load_ds_config(cfg.deepspeed)
    out = Path(cfg.output_dir)
    check_same_run(cfg, out)  # before anything is written there
    lock = hold_output_dir(out)  # before anything is read or removed there
    try:
        return _run_locked(cfg, ds_file_config, out)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, ds_file_config: dict, out: Path) -> dict:
    started = time.time()
    splits = load_splits(cfg.data)
    ctx = RunContext.build(cfg, ds_file_config, splits)
    if distributed.is_main():
        print(f"hsft: recipe {cfg.recipe or 'none'}, {ctx.precision} on {ctx.device}, "
              f"{distributed.world_size()} rank(s); output {out}" + (" (--resume)" if cfg.resume else ""), flush=True)
    if cfg.hsft.cuda_graph and ctx.device.type != "cuda":
        raise PipelineError(f"--hsft-cuda-graph: CUDA graphs need a CUDA device; this run is on {ctx.device}")
    _check_output_dir(cfg, out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if distributed.is_main():
        print(f"data: {cfg.data.format} train {len(splits.train)} / val {len(splits.val)} / held-out test "
              f"{len(splits.test)}")
    step = _step_before(ctx, cfg.stages[0])  # the run-wide step: counted here, each stage returns where it ended
    current, start_label = _starting_model(ctx)
    try:
        estimate = plan_for_run(cfg, ctx.ds_config, device=ctx.device.type, precision=ctx.precision,
                                world_size=distributed.world_size(), splits=splits, start=current)
    except (ValueError, KeyError, OSError, AttributeError) as err:  # an estimate must not stop a run
        estimate = None
        if distributed.is_main():
            print(f"memory plan: not available ({type(err).__name__}: {err})", flush=True)
    plan = None if estimate is None else estimate.to_dict()
    if distributed.is_main() and estimate is not None:
        print(format_plan(estimate), flush=True)
    # Every model this run started from or produced, in order: what the evaluation stage is handed.
    models: list[RunModel] = [RunModel("start", current)] if current is not None and cfg.eval.evaluate_start else []
    results: dict[str, StageResult] = {}
    written: dict[str, str] = {}
    ran: list[str] = []

    starts: dict[str, Path | None] = {}  # the model each stage started from
    resources: dict[str, dict] = {}  # each stage's wall time and peak memory on this rank
    for stage in (STAGE_BY_NAME[name] for name in cfg.stages):
        stage_dir = ctx.stage_dir(stage.name)
        start = starts.get(stage.beside, current) if stage.beside else current
        starts[stage.name] = start
        result = _finished(stage, stage_dir) if cfg.resume else None
        if result is not None:
            if distributed.is_main():
                print(f"[{stage.name}] already complete in {stage_dir}; skipping (--resume)")
        else:
            if not ran:
                # The first stage that runs: from here on the run's settings are these (a finished run
                # resumed writes nothing).
                write_json(out / RUN_CONFIG_FILE, asdict(cfg))
                write_json(out / RESOURCES_FILE, {"memory_plan": plan, "stages": {}})
            ran.append(stage.name)
            inputs = {name: list(models) if name == "models" else getattr(cfg, name) for name in stage.inputs}
            with measure(ctx.device) as usage:
                result = stage.run(ctx.at_step(step), getattr(cfg, stage.config), start, **inputs)
            resources[stage.name] = {**usage.to_dict(), "notes": stage_notes(stage.name, result.summary)}
            if distributed.is_main():  # kept as the run goes, so a run stopped early still shows its stages
                write_json(out / RESOURCES_FILE, {"memory_plan": plan, "stages": resources})
            if stage.trains and stage.name != "base" and not cfg.standalone and current is not None:
                keep_only_changes(result.model_dir, current)
            if distributed.is_main():
                if stage.trains and result.model_dir is not None:
                    write_training_record(result.model_dir, recipe=cfg.recipe, precision=ctx.precision,
                                          embedded_default=cfg.embedded_default, stage=stage.name)
                save_stage_result(stage_dir, result)
            distributed.barrier()
        results[stage.name] = result
        if result.global_step is not None:
            step = result.global_step
        written.update(result.written)
        if result.model_dir is not None:
            written[f"{stage.name} model"] = str(result.model_dir)
            models.append(RunModel(stage.name, result.model_dir, started_from=start, beside=stage.beside))
            if stage.beside is None:
                current = result.model_dir

    if not ran and (out / "report.md").is_file() and (out / "report.json").is_file():
        # A finished run resumed: nothing changes, the report is the one it wrote.
        if distributed.is_main():
            print("\n" + console_summary((out / "report.md").read_text(), out))
        distributed.barrier()
        return json.loads((out / "report.json").read_text())
    report = {"output_dir": str(out), "start": start_label, "stages": list(cfg.stages), "recipe": cfg.recipe,
              "data": {"format": cfg.data.format, "train": len(splits.train), "val": len(splits.val),
                       "test": len(splits.test)},
              "seed": cfg.seed, "world_size": distributed.world_size(), "device": str(ctx.device),
              "precision": ctx.precision}
    for name, result in results.items():
        report[STAGE_BY_NAME[name].report_key or name] = result.summary
    report["resources"] = resources
    report["memory_plan"] = plan
    written["TensorBoard"] = str(out / "tb")
    report["written"] = written
    report["final_model"] = None if current is None else str(current)
    report["seconds"] = time.time() - started
    write_json(out / "report.json", report)
    if distributed.is_main():
        text = format_report(cfg, report, results)
        (out / "report.md").write_text(text)
        print("\n" + console_summary(text, out))
    distributed.barrier()
    return report


def resume_hint(cfg: RunConfig) -> str:
    return (f"run the same command with --resume to continue from the last finished epoch in {cfg.output_dir}"
            if not cfg.resume else "run the same command again to continue from the last finished epoch")


def exit_code(prog: str, action: Callable[[], object], hint: str | None = None) -> int:
    """Run `action` as the command `prog` (hsft.errors.run_command: one line and exit 2 for bad input, a
    traceback for a bug, 3 when the run stopped itself, 130 with `hint` on an interrupt)."""
    return run_command(prog, action, resume_hint=hint)


def main(cfg: RunConfig) -> int:
    """Run the pipeline; bad input ends with one clear line (HSFT_DEBUG=1 shows the traceback)."""
    return exit_code("hsft", lambda: run_pipeline(cfg), resume_hint(cfg))
