"""The main command: stage 0 (embedded default only) -> LoRA -> DPO -> mining -> HSFT -> evaluation.

Each stage reads the previous stage's output directory and writes its own; `report.json` and
`report.md` at the top of the output directory summarise the run. Any contiguous sub-list of the
stages can be selected; the first selected stage starts from `--start DIR`, or from the newest
finished stage already in the output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hsft.config import STAGE_ORDER, RunConfig
from hsft.data import load_splits
from hsft.engine import distributed
from hsft.engine.ds_config import DeepSpeedConfigError, load_ds_config, precision_of
from hsft.engine.loop import NonFiniteTrainingError, write_json
from hsft.engine.output_lock import OutputDirInUse, hold_output_dir
from hsft.model import Sa2VAModel, build_model
from hsft.model.chain import make_lean
from hsft.model.checkpoint import META_FILE, is_model_directory
from hsft.stages import base as base_stage
from hsft.stages import mining as mining_stage
from hsft.stages.hsft import HSFTTask, select_training_set
from hsft.stages.runner import StageContext, is_complete, model_dir, run_training_stage, training_dtype

TRAINING_STAGES = ("base", "lora", "dpo", "hsft")


class PipelineError(RuntimeError):
    pass


def _load(path: Path) -> Sa2VAModel:
    return Sa2VAModel.from_pretrained(path)


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


def _starting_model(cfg: RunConfig, ctx: StageContext) -> tuple[Path | None, str]:
    """The model directory the first selected stage reads, and a label for the report."""
    if cfg.start:
        start = Path(cfg.start)
        if not is_model_directory(start):
            raise PipelineError(f"--model {start}: not a saved hsft model directory (no {META_FILE}); pass a "
                                "stage's model/ directory")
        return start, f"--model {start}"
    first = STAGE_ORDER.index(cfg.stages[0])
    for name in reversed(STAGE_ORDER[:first]):
        if name in TRAINING_STAGES and is_complete(ctx.stage_dir(name)):
            return model_dir(ctx.stage_dir(name)), f"stage {name} of {ctx.out_dir}"
    if cfg.stages[0] == "base":
        return None, "embedded tiny preset"
    if cfg.model.vlm is not None:
        init = ctx.stage_dir("init")
        if distributed.is_main():
            build_model(cfg.model, seed=cfg.seed).save_pretrained(model_dir(init))
        distributed.barrier()
        return model_dir(init), f"--vlm {cfg.model.vlm} + --sam2 {cfg.model.sam2}"
    raise PipelineError(f"stage {cfg.stages[0]!r} needs a starting model: pass --model DIR (a stage's model/ "
                        "directory), --vlm/--sam2, or include the earlier stages")


def keep_only_changes(directory: Path, base: Path) -> None:
    """Rewrite a finished stage's model directory as the tensors it changed plus a reference to `base`."""
    if distributed.is_main():
        make_lean(directory, base)
    distributed.barrier()


def _continue_global_step(ctx: StageContext, before: str) -> None:
    """TensorBoard's step never resets: continue from the last finished stage before `before`."""
    for name in reversed(STAGE_ORDER[:STAGE_ORDER.index(before)]):
        metrics = ctx.stage_dir(name) / "metrics.json"
        if metrics.is_file():
            ctx.global_step = max(ctx.global_step, json.loads(metrics.read_text()).get("global_step_end", 0))
            return


def run_base(cfg: RunConfig, ctx: StageContext, splits) -> Path:
    stage_dir = ctx.stage_dir("base")
    precision = cfg.base.precision or ctx.precision or precision_of(ctx.ds_base)
    key = base_stage.cache_key(cfg.base, cfg.model, cfg.data, cfg.seed, precision)
    cached = base_stage.cache_root(cfg.base) / f"base-{key}"
    if not is_complete(cached):
        if distributed.is_main():
            print(f"[base] pre-training the embedded tiny model (cached afterwards under {cached})")
        pool, held = base_stage.pool_for(cfg.base, cfg.data, cfg.seed)
        torch.manual_seed(cfg.seed)
        task = base_stage.BaseTask(build_model(cfg.model, seed=cfg.seed), pool, cfg.base, held, cfg.mining)
        # Train inside the cache directory itself so an interrupted pre-training resumes with --resume.
        cache_ctx = StageContext(cached.parent, ctx.ds_base, cfg.seed, precision, ctx.resume, ctx.global_step)
        cached_name = cached.name
        task.name = cached_name
        run_training_stage(cache_ctx, task, cfg.base.train,
                           load_input_model=lambda: build_model(cfg.model, seed=cfg.seed))
        if distributed.is_main():
            shutil.rmtree(cached / "checkpoints", ignore_errors=True)  # the weights are what is reused
            shutil.rmtree(cached.parent / "tb" / cached_name, ignore_errors=True)
    elif distributed.is_main():
        print(f"[base] reusing the pre-trained embedded model cached at {cached}")
    base_stage.copy_cached(cached, stage_dir)
    _continue_global_step(ctx, "lora")
    return model_dir(stage_dir)


def run_mining(cfg: RunConfig, ctx: StageContext, model_path: Path, splits) -> None:
    model = _load(model_path)
    result = mining_stage.mine_hard_samples(model, splits.train, cfg.mining)
    tb = ctx.tb("mining")
    mining_stage.write_mining(result, ctx.stage_dir("mining"), tb, ctx.global_step)
    tb.close()
    distributed.barrier()
    ctx.results["mining"] = {"rule": result.rule, "hard": len(result.hard_ids), "total": len(result.samples),
                             "table": result.table()}


def run_hsft(cfg: RunConfig, ctx: StageContext, model_path: Path, splits) -> Path:
    hard_ids = mining_stage.read_hard_ids(ctx.stage_dir("mining"))
    train_set = select_training_set(splits.train, hard_ids, cfg.hsft.control, cfg.seed,
                                    source=str(ctx.stage_dir("mining") / "hard_samples.json"))
    ctx.results["hsft"] = {"samples": len(train_set), "control": cfg.hsft.control, "cache": cfg.hsft.cache_features}
    if not train_set:
        # A model with no training sample below tau has nothing to fine-tune on: pass it on unchanged so
        # the evaluation still runs, and say so (as DPO does when it finds no pair).
        message = (f"no training sample has Dice < tau = {cfg.mining.tau}; HSFT skipped, the input model is passed "
                   "on unchanged (raise --tau or use --hard-quantile to train)")
        stage_dir = ctx.stage_dir("hsft")
        if distributed.is_main():
            print(f"[hsft] {message}")
            shutil.copytree(model_path, model_dir(stage_dir), dirs_exist_ok=True)
            write_json(stage_dir / "metrics.json", {"stage": "hsft", "skipped": True, "reason": message, "samples": 0,
                                                    "optimizer_steps": 0, "global_step_end": ctx.global_step})
        distributed.barrier()
        ctx.results["hsft"]["skipped"] = True
        return model_dir(stage_dir)
    # In the training dtype up front: DeepSpeed's bf16 cast converts parameters, not buffers.
    task = HSFTTask(_load(model_path).to(training_dtype(ctx)), train_set, cfg.hsft, splits.val, cfg.mining)
    run_training_stage(ctx, task, cfg.hsft.train, load_input_model=lambda: _load(model_path))
    return model_dir(ctx.stage_dir("hsft"))


def run_eval(cfg: RunConfig, ctx: StageContext, models: list[tuple[str, Path]], splits) -> list[dict]:
    """Evaluate every model of the run on the held-out split (never seen in training or mining)."""
    from hsft.eval import evaluate_model

    rows = []
    for name, path in models:
        tb = ctx.tb(f"eval_{name}")
        summary = evaluate_model(_load(path), splits.test, cfg.eval_settings(), out_dir=ctx.stage_dir("eval") / name, tb=tb,
                                 step=ctx.global_step, tag=f"eval/{name}")
        tb.close()
        gen, fwd = summary["paths"]["generate"], summary["paths"]["forward"]
        rows.append({"stage": name, "model": str(path), "dice": gen["dice"], "iou": gen["iou"],
                     "forward_dice": fwd["dice"], "seg_rate": summary["generate"]["seg_rate"],
                     "misses": summary["generate"]["misses"], "n": summary["n"]})
    baseline = rows[0]["dice"] if rows else 0.0
    for i, row in enumerate(rows):
        row["delta_prev"] = row["dice"] - rows[i - 1]["dice"] if i else 0.0
        row["delta_base"] = row["dice"] - baseline
    return rows


def format_report(cfg: RunConfig, report: dict) -> str:
    lines = ["# hsft run report", "", f"Output directory: `{report['output_dir']}`  ",
             f"Started from: {report['start']}  ", f"Stages: {', '.join(report['stages'])}  ",
             f"Held-out split: {report['data']['test']} samples ({cfg.data.format}); training split "
             f"{report['data']['train']}, validation {report['data']['val']}", ""]
    if report.get("evaluation"):
        lines += ["## Held-out results (generate path, as a user's inference runs)", "",
                  "| stage | Dice | Δ prev | Δ baseline | IoU | forward-path Dice | [SEG] rate |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["evaluation"]:
            lines.append(f"| {row['stage']} | {row['dice']:.4f} | {row['delta_prev']:+.4f} | {row['delta_base']:+.4f} "
                         f"| {row['iou']:.4f} | {row['forward_dice']:.4f} | {row['seg_rate']:.2f} |")
        lines += ["", "Per-path details, discrepancy and overlays: `eval/<stage>/eval.md`.", ""]
    if "mining" in report:
        lines += ["## Hard-sample mining (training split)", "", "| Dice | count | percent | category |",
                  "|---|---:|---:|---|"]
        for row in report["mining"]["table"]:
            lines.append(f"| {row['range']} | {row['count']} | {row['percent']:.1f}% | {row['category']} |")
        m = report["mining"]
        lines += ["", f"Hard set ({m['rule']}): {m['hard']} of {m['total']} training samples.", ""]
    notes = []
    if "lora" in report:
        r = report["lora"]
        notes.append(f"- LoRA: r {r['rank']}, alpha {r['alpha']} on {r['adapted_modules']} language-model projections, "
                     f"{r['optimizer_steps']} optimizer steps on {r['samples']} samples")
    if "dpo" in report:
        r = report["dpo"]
        notes.append(f"- DPO: {r['pairs']} preference pairs of {r['samples']} training samples (Dice < "
                     f"{r['pair_threshold']}), {r['loss']} loss, beta {r['beta']}, {r['normalisation']} normalisation"
                     + (" -- skipped: no pair" if r.get("skipped") else ""))
    if "hsft" in report:
        r = report["hsft"]
        what = "a random training subset of the hard set's size (matched-compute control)" \
            if r["control"] == "random" else "the hard set"
        notes.append(f"- HSFT: {r['samples']} samples ({what}), frozen-feature cache {'on' if r['cache'] else 'off'}"
                     + (" -- skipped: empty hard set" if r.get("skipped") else ""))
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
    ds_base = load_ds_config(cfg.deepspeed)
    out = Path(cfg.output_dir)
    lock = hold_output_dir(out)  # before anything is read or removed there
    try:
        return _run_locked(cfg, ds_base, out)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, ds_base: dict, out: Path) -> dict:
    _check_output_dir(cfg, out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    started = time.time()
    ctx = StageContext(out_dir=out, ds_base=ds_base, seed=cfg.seed, precision=cfg.precision, resume=cfg.resume,
                       keep_checkpoints=cfg.keep_checkpoints)
    _continue_global_step(ctx, cfg.stages[0])
    write_json(out / "run_config.json", asdict(cfg))

    splits = load_splits(cfg.data)
    if distributed.is_main():
        print(f"data: {cfg.data.format} train {len(splits.train)} / val {len(splits.val)} / held-out test "
              f"{len(splits.test)}; {distributed.world_size()} rank(s)")
    current, start_label = _starting_model(cfg, ctx)
    evaluated: list[tuple[str, Path]] = [("start", current)] if current is not None else []
    written: dict[str, str] = {}

    for stage in cfg.stages:
        stage_dir = ctx.stage_dir(stage)
        previous = current
        if stage in TRAINING_STAGES and cfg.resume and is_complete(stage_dir):
            if distributed.is_main():
                print(f"[{stage}] already complete in {stage_dir}; skipping (--resume)")
            current = model_dir(stage_dir)
            _continue_global_step(ctx, STAGE_ORDER[STAGE_ORDER.index(stage) + 1])
        elif stage == "base":
            current = run_base(cfg, ctx, splits)
            evaluated = [("base", current)]
        elif stage == "lora":
            from hsft.stages.lora import run_lora

            current = run_lora(cfg, ctx, current, splits)
        elif stage == "dpo":
            from hsft.stages.dpo import run_dpo

            current = run_dpo(cfg, ctx, current, splits)
        elif stage == "mining":
            run_mining(cfg, ctx, current, splits)
            written["hard set"] = str(stage_dir / "hard_samples.json")
            continue
        elif stage == "hsft":
            current = run_hsft(cfg, ctx, current, splits)
        elif stage == "eval":
            continue
        if stage in TRAINING_STAGES:
            if stage != "base" and not cfg.standalone and previous is not None and current != previous:
                keep_only_changes(current, previous)
            written[f"{stage} model"] = str(current)
            if (stage, current) not in evaluated:
                evaluated.append((stage, current))

    report = {"output_dir": str(out), "start": start_label, "stages": list(cfg.stages),
              "data": {"format": cfg.data.format, "train": len(splits.train), "val": len(splits.val),
                       "test": len(splits.test)},
              "seed": cfg.seed, "world_size": distributed.world_size(), **ctx.results}
    if "eval" in cfg.stages:
        report["evaluation"] = run_eval(cfg, ctx, evaluated, splits)
        written["evaluation"] = str(ctx.stage_dir("eval"))
    written["TensorBoard"] = str(out / "tb")
    report["written"] = written
    report["seconds"] = time.time() - started
    write_json(out / "report.json", report)
    if distributed.is_main():
        text = format_report(cfg, report)
        (out / "report.md").write_text(text)
        print("\n" + text)
    distributed.barrier()
    return report


def main(cfg: RunConfig) -> int:
    """Run the pipeline; bad input ends with one clear line (HSFT_DEBUG=1 shows the traceback)."""
    try:
        run_pipeline(cfg)
    except NonFiniteTrainingError as err:
        print(f"hsft: stopped: {err}", file=sys.stderr)
        return 3
    except (PipelineError, DeepSpeedConfigError, OutputDirInUse, ValueError, FileNotFoundError) as err:
        if os.environ.get("HSFT_DEBUG"):
            raise
        print(f"hsft: error: {err}", file=sys.stderr)
        return 2
    return 0
