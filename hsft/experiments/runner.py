"""Run a suite: for every seed its starting model, its prefix and its arms, each an ordinary run
directory; then the results (hsft.experiments.results).

    <out>/suite.json            the suite, the seeds and the resolved config (a resumed suite must match)
    <out>/seed<s>/base/         stage 0 of the embedded default trained with seed s (a cached function of its
                                settings and the seed), so the study's spread includes stage 0's
    <out>/base/                 with shared_stage0: one stage 0 for every seed, as a released checkpoint is
    <out>/seed<s>/prefix/       LoRA, DPO, mining, HSFT, control, evaluation with seed s
    <out>/seed<s>/<arm>/        one fine-tuning stage from the prefix's DPO model, evaluated
    <out>/results.{json,md}, <out>/plots/*.png, <out>/tb/

Every run of seed s draws its validation split with seed s as well. Resumable: a run directory with its
report.json is finished and skipped; an unfinished one continues with --resume semantics (finished stages
skipped, the latest checkpoint resumed). The held-out split is only ever read by the evaluation stage and
the results; the validation split is the only one any choice (the picked tau) is made on. The console
gets one line per finished run; each run's own output goes to its `log.txt` (all of it with verbose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from hsft.config import RunConfig, replace_nested
from hsft.data import load_splits
from hsft.engine import distributed
from hsft.engine.context import RunContext, run_precision
from hsft.engine.ds_config import load_ds_config
from hsft.engine.files import write_json
from hsft.engine.output_lock import hold_output_dir
from hsft.errors import BadValue
from hsft.eval.inference import generate_and_score
from hsft.experiments.suites import Arm, build_suite
from hsft.model import load_model
from hsft.pipeline import RESUME_NEUTRAL, run_pipeline
from hsft.stages.training import model_dir

__all__ = ["SuiteError", "run_suite", "PREFIX_STAGES", "TRAIN_DICE_FILE"]

PREFIX_STAGES = ("lora", "dpo", "mining", "hsft", "control", "eval")
TRAIN_DICE_FILE = "train_dice.json"


class SuiteError(BadValue):
    """A suite command the user can fix (its seeds, its output directory, its reference file)."""


def _finished(run_dir: Path) -> bool:
    return (run_dir / "report.json").is_file()


LOG_FILE = "log.txt"


@contextlib.contextmanager
def _output_to(log: Path | None):
    """Everything the process writes to stdout and stderr (Python, DeepSpeed's loggers, progress bars, C++)
    goes to `log` while the block runs; None leaves the console as it is."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "a", encoding="utf-8") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _outcome(run_dir: Path) -> str:
    """A finished run in a few words: the held-out Dice of what it trained last."""
    report = json.loads((run_dir / "report.json").read_text())
    rows = report.get("evaluation") or []
    if report.get("unet"):
        unet = report["unet"]
        return f"U-Net Dice {unet['dice']:.4f} on the {unet['split']} split after {unet['epochs']} epochs"
    if not rows:
        return "done"
    handed_on = [r for r in rows if not r.get("beside")]  # the prefix: HSFT rather than the control beside it
    last = (handed_on or rows)[-1]
    return f"{last['stage']} Dice {last['dice']:.4f} on the {last.get('split', 'test')} split"


def _run(cfg: RunConfig, run_dir: Path, label: str, progress: dict, verbose: bool = False) -> None:
    """One pipeline run into `run_dir`, unless it already finished; one console line when it ends."""
    progress["done"] += 1
    head = f"[experiments] ({progress['done']}/{progress['total']}) {label}"
    if _finished(run_dir):
        if distributed.is_main():
            print(f"{head}: finished earlier, kept", flush=True)
        return
    started = time.time()
    if verbose and distributed.is_main():
        print(f"{head} -> {run_dir}", flush=True)
    log = None if verbose else run_dir / (LOG_FILE if distributed.is_main() else f"log.rank{distributed.rank()}.txt")
    try:
        with _output_to(log):
            run_pipeline(dataclasses.replace(cfg, output_dir=str(run_dir), resume=True, overwrite=False))
    except BaseException:
        if log is not None and distributed.is_main():
            print(f"{head}: stopped; its output is in {log}", flush=True)
        raise
    if distributed.is_main():
        elapsed = time.time() - progress["started"]
        print(f"{head}: {_outcome(run_dir)}, {(time.time() - started) / 60:.1f} min "
              f"({elapsed / 60:.1f} min into the suite)", flush=True)


def _results_settings(config: dict) -> dict:
    """A recorded run config without the settings that change no result (hsft.pipeline.RESUME_NEUTRAL)."""
    kept = json.loads(json.dumps(config))
    for name in RESUME_NEUTRAL:
        *parents, leaf = name.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return kept


def _check_same_suite(out: Path, record: dict) -> None:
    """A suite directory continues only the suite it holds: same suite and settings (seeds may be added)."""
    path = out / "suite.json"
    if not path.is_file():
        return
    try:
        held = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SuiteError(f"{path}: not valid JSON ({err}); remove it or choose another --output-dir") from None
    same_stage0 = held.get("shared_stage0", False) == record["shared_stage0"]
    # Where the suite lives and how much it prints change no result: a moved suite directory continues.
    held_config, config = _results_settings(held.get("config", {})), _results_settings(record["config"])
    if held.get("suite") != record["suite"] or held_config != config or not same_stage0:
        changed = sorted(k for k in set(held_config) | set(config) if held_config.get(k) != config.get(k))
        if not same_stage0:
            changed.append("--shared-stage0")
        what = (f"suite {held.get('suite')!r}" if held.get("suite") != record["suite"] else
                f"settings ({', '.join(changed)})")
        raise SuiteError(f"--output-dir {out} holds a suite run with other {what}; continue it with the same command "
                         "or choose another --output-dir")


def _suite_config(cfg: RunConfig) -> RunConfig:
    """What every run of the suite shares. The per-seed runs start from a model directory even for the
    embedded default, so the defaults that follow "is this a real checkpoint?" (the [SEG] rows, the
    precision) are fixed here, as the main command would resolve them."""
    seg_rows = cfg.lora.seg_rows if cfg.lora.seg_rows is not None else not cfg.embedded_default
    precision = cfg.precision or run_precision(cfg, load_ds_config(cfg.deepspeed), distributed.local_device())
    return replace_nested(cfg, precision=precision, **{"lora.seg_rows": seg_rows})


def measure_train_dice(cfg: RunConfig, model: Path, out_file: Path) -> None:
    """The training split's generate-path Dice of `model` (the epochs table shows it beside the held-out Dice)."""
    if out_file.is_file():
        return
    ctx = RunContext.build(cfg, load_ds_config(cfg.deepspeed))
    splits = load_splits(cfg.data)
    scored = generate_and_score(load_model(model, device=ctx.device, dtype=ctx.dtype), splits.train,
                                batch_size=cfg.mining.batch_size, max_new_tokens=cfg.mining.max_new_tokens,
                                desc="train dice")
    if distributed.is_main():
        write_json(out_file, {"model": str(model), "mean": sum(s.dice for s in scored) / len(scored),
                              "per_sample": {s.id: s.dice for s in scored}})
    distributed.barrier()


def arm_config(cfg: RunConfig, arm: Arm, seed: int, prefix: Path) -> RunConfig:
    # The DPO model was evaluated in the prefix, with overlays: an arm evaluates only what it trained.
    arm_cfg = replace_nested(cfg, **{"eval.evaluate_start": False, "eval.overlays": 0, "eval.fixed_overlays": 0,
                                     **dict(arm.overrides)})
    stages = (("mining",) if arm.remine else ()) + (arm.stage,) + (() if arm.evaluated_by_stage else ("eval",))
    return dataclasses.replace(arm_cfg, seed=seed, start_model=str(model_dir(prefix / "dpo")), stages=stages)


def _share_mining(source: Path, run_dir: Path) -> None:
    """An arm with another run's mining settings (the prefix's, or the subset row it controls) reads that
    run's hard set instead of mining again."""
    if distributed.is_main() and not (run_dir / "mining").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / "mining", run_dir / "mining")
    distributed.barrier()


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """Every run of one seed: the training seed and the validation split's draw."""
    return replace_nested(cfg, seed=seed, **{"data.seed": seed})


def run_suite(cfg: RunConfig, suite_name: str, seeds: list[int], out: Path, *, reference: Path | None = None,
              shared_stage0: bool = False, verbose: bool = False) -> dict:
    """Run (or continue) the suite and write its results; returns results.json's content. For the embedded
    default every seed trains its own stage 0 unless `shared_stage0`."""
    from hsft.experiments.results import collect, write_results

    distributed.init_distributed()
    if not seeds or len(set(seeds)) != len(seeds):
        raise SuiteError(f"--seeds: give one or more distinct seeds, got {seeds}")
    suite, cfg = build_suite(suite_name, cfg)
    # The suite decides the stages of every run; validated as the whole study's stage list.
    cfg = dataclasses.replace(cfg, stages=(("base",) if cfg.embedded_default else ()) + PREFIX_STAGES)
    cfg.validate()
    cfg = _suite_config(cfg)  # reads the DeepSpeed file: a bad one stops here, not after the first run
    reference_table = read_reference(reference) if reference else None
    out = Path(out)
    shared_stage0 = shared_stage0 or not cfg.embedded_default  # a given model is one model for every seed
    record = {"suite": suite.name, "seeds": list(seeds), "shared_stage0": shared_stage0,
              "config": json.loads(json.dumps(asdict(cfg), default=str))}
    lock = hold_output_dir(out)
    try:
        _check_same_suite(out, record)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "suite.json", record)
        distributed.barrier()
        arms = suite.arms()
        stage0_runs = (0 if not cfg.embedded_default else 1 if shared_stage0 else len(seeds))
        progress = {"done": 0, "total": stage0_runs + len(seeds) * (1 + len(arms)), "started": time.time()}
        if distributed.is_main():
            print(f"[experiments] suite {suite.name}, seeds {', '.join(map(str, seeds))}: {progress['total']} runs; "
                  + ("stage 0 trained per seed" if not shared_stage0 else
                     "one stage 0 for every seed" if cfg.embedded_default else f"every seed from {cfg.start_model}")
                  + ("" if verbose else "; each run's output in its log.txt"), flush=True)
        if cfg.embedded_default and shared_stage0:
            _run(dataclasses.replace(cfg, stages=("base",)), out / "base", "stage 0 (embedded default, shared)",
                 progress, verbose)
        # Every seed's starting model and prefix first (the per-stage and per-sample tables), then the arms: a
        # suite stopped part-way has its main tables for every seed.
        for seed in seeds:
            seed_cfg = seed_config(cfg, seed)
            if not cfg.embedded_default:
                start = Path(cfg.start_model)
            elif shared_stage0:
                start = model_dir(out / "base" / "base")
            else:
                _run(dataclasses.replace(seed_cfg, stages=("base",)), out / f"seed{seed}" / "base",
                     f"seed {seed}: stage 0", progress, verbose)
                start = model_dir(out / f"seed{seed}" / "base" / "base")
            prefix = out / f"seed{seed}" / "prefix"
            _run(dataclasses.replace(seed_cfg, start_model=str(start), stages=PREFIX_STAGES), prefix,
                 f"seed {seed}: prefix ({', '.join(PREFIX_STAGES)})", progress, verbose)
            if any(a.train_dice and a.same_as for t in suite.tables for a in t.arms):
                measure_train_dice(seed_cfg, model_dir(prefix / "hsft"), prefix / TRAIN_DICE_FILE)
        for seed in seeds:
            seed_cfg, prefix = seed_config(cfg, seed), out / f"seed{seed}" / "prefix"
            for arm in arms:
                run_dir = out / f"seed{seed}" / arm.name
                if not arm.remine:
                    _share_mining(out / f"seed{seed}" / (arm.mining_from or "prefix"), run_dir)
                _run(arm_config(seed_cfg, arm, seed, prefix), run_dir, f"seed {seed}: {arm.label}", progress, verbose)
                if arm.train_dice:
                    measure_train_dice(seed_cfg, model_dir(run_dir / arm.stage), run_dir / TRAIN_DICE_FILE)
        results = collect(suite, seeds, out, cfg, reference=reference_table, shared_stage0=shared_stage0)
        if distributed.is_main():
            write_results(results, suite, out)
            print(f"\n[experiments] results: {out / 'results.md'} ({(time.time() - progress['started']) / 60:.1f} min)")
        distributed.barrier()
        return results
    finally:
        lock.release()


def read_reference(path: Path) -> dict:
    """The paper's own numbers, for the labelled reference column: a JSON object
    {table key: {row label or arm name: number}} (e.g. {"4.4.1": {"hsft": 0.83}})."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"--reference {path}: no such file")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SuiteError(f"--reference {path}: not valid JSON ({err})") from None
    if not isinstance(table, dict) or not all(isinstance(rows, dict) and all(isinstance(v, (int, float))
                                                                            for v in rows.values())
                                              for rows in table.values()):
        raise SuiteError(f"--reference {path}: expected {{\"<table key>\": {{\"<row>\": <number>, ...}}, ...}}")
    return table
