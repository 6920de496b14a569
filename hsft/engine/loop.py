"""The one training loop every stage runs: DeepSpeed (ZeRO-2, bf16) around a `TrainTask`.

A stage describes *what* to train (module, data, loss) as a TrainTask; this file is *how*:
data order, accumulation, the schedule, the non-finite guard, logging, checkpoints and resume.
It reads top to bottom as one epoch loop.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hsft.engine.config import TrainConfig
from hsft.engine import checkpoint, distributed, rng_state
from hsft.engine.ds_config import stage_ds_config
from hsft.engine.schedule import build_scheduler, move_to_step
from hsft.engine.context import RunContext
from hsft.engine.tensorboard import TBWriter
from hsft.engine.verbosity import is_verbose
from hsft.errors import BadValue, RunStopped


class TrainTask(Protocol):
    """What a stage trains.

    `module` has its trainable parameters set (requires_grad) before the loop, and its forward takes a
    micro-batch and returns (loss to minimise, named terms to log); the loss is a mean over the
    micro-batch's samples, so 1 rank x micro-batch 2 and 2 ranks x micro-batch 1 take the same step.
    """

    name: str
    module: nn.Module

    def __len__(self) -> int: ...

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device) -> Any:
        """The micro-batch holding these training-set indices: every tensor on `device`, floating
        tensors in `dtype`."""

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """End-of-epoch metrics (e.g. validation Dice); {} when there is nothing to measure."""

    def client_state(self) -> dict[str, Any]:
        """Extra state stored in every checkpoint (e.g. the hard-set ids)."""

    # Optional: `sample_ids(indices) -> list[str]`, the ids a skipped step names in the log (the
    # training-set indices are named when the task has no such method); `epoch_order(epoch, global_batch,
    # seed) -> list[int]`, the indices of an epoch (whole global batches), instead of a seeded shuffle of
    # range(len(task)).


class NonFiniteTrainingError(RunStopped):
    """Too many optimizer steps in a row were skipped; nothing of the unfinished epoch was saved."""


@dataclass
class TrainResult:
    global_step: int  # the run-wide step after this stage (the next stage continues from it)
    optimizer_steps: int
    skipped_steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step, in order
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: str | None = None
    last_lr: float = 0.0  # the scheduler's learning rate after the last step
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global gradient norm of every step
    # One entry per skipped step: {"step", "epoch", "reason", "samples"} (sample ids of the window).
    skipped: list[dict[str, Any]] = field(default_factory=list)
    engine: Any = None  # the DeepSpeed engine, for inspection (optimizer state) by tools and tests
    # The trained parameters' float32 values (rank 0; empty elsewhere), named as in task.module.
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; biases and norm weights (1-D tensors) without weight decay."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the stage froze every parameter: nothing to train")
    return groups


def wrap_to_batches(order: list[int], global_batch: int) -> list[int]:
    """`order` wrapped around to a whole number of global batches, so every rank runs the same number of
    steps and every listed sample is seen at least once."""
    if not order:
        return order
    pad = math.ceil(len(order) / global_batch) * global_batch - len(order)
    return order + (order * (pad // len(order) + 1))[:pad]


def epoch_order(num_samples: int, global_batch: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation for this epoch, wrapped around to a whole number of global batches so every
    sample is seen at least once per epoch and every rank runs the same number of steps."""
    return wrap_to_batches(np.random.default_rng([seed, epoch]).permutation(num_samples).tolist(), global_batch)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_change_note(stage: str, point: checkpoint.ResumePoint, state: dict[str, Any], global_batch: int,
                      saved_steps_per_epoch: int, steps_per_epoch: int, new_ranks: bool) -> str:
    """What resuming on another number of ranks restores exactly and what it cannot reproduce."""
    saved_batch = state.get("global_batch", "?")
    lines = [f"[{stage}] the checkpoint was written by {point.saved_world} rank(s), this run has {point.world}: "
             f"the trained weights, their fp32 master copies, the AdamW moments and the schedule's step are "
             f"restored exactly (re-partitioned from the universal copy {point.ckpt_dir}/.universal-{point.tag}).",
             f"[{stage}] from here the run is not bit for bit what it would have been on {point.saved_world} "
             f"rank(s): every epoch visits the samples in the same seeded order, but each step's samples are split "
             f"over the ranks differently, so the random draws (dropout masks) differ and the gradient average is "
             f"rounded differently."]
    if new_ranks:
        lines.append(f"[{stage}] rank(s) the checkpoint has no RNG state for start from a seed derived from the "
                     f"run seed, the rank and the epoch (the same on every resume).")
    if saved_steps_per_epoch != steps_per_epoch:
        lines.append(f"[{stage}] the global batch is {global_batch} (micro-batch x accumulation x ranks), it was "
                     f"{saved_batch}: the optimizer steps see other groups of samples, an epoch takes "
                     f"{steps_per_epoch} step(s) instead of {saved_steps_per_epoch}, and the learning-rate schedule, "
                     f"laid over the new step count, continues from this epoch boundary's place in it. Keep the "
                     f"global batch (e.g. double the micro-batch when halving the ranks) to keep the steps the same.")
    return "\n".join(lines)


def sample_ids(task: TrainTask, indices: list[int]) -> list[str]:
    """The ids of these training-set indices, for log lines that must point at the data."""
    named = getattr(task, "sample_ids", None)
    return list(named(indices)) if named is not None else [f"#{i}" for i in indices]


def train(task: TrainTask, cfg: TrainConfig, ctx: RunContext, *, stage_dir: Path, tb: TBWriter) -> TrainResult:
    """Train `task` with `cfg` in the run `ctx` (DeepSpeed config, precision, seed, resume, the run-wide
    step); checkpoints go to `stage_dir/checkpoints`. Returns the trained weights (float32, rank 0)."""
    import deepspeed

    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    seed, resume, step_offset = ctx.seed, ctx.resume, ctx.global_step
    stage_dir = Path(stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    start_time = time.time()

    # --- what one epoch looks like -------------------------------------------------------------
    if len(task) == 0:
        raise BadValue(f"stage {task.name}: the training set is empty")
    global_batch = cfg.global_batch(world)
    steps_per_epoch = math.ceil(len(task) / global_batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_ratio * total_steps)

    # --- DeepSpeed: freezing already happened in the task, so only trainable params reach AdamW ----
    _seed_everything(seed)
    optimizer = torch.optim.AdamW(param_groups(task.module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
    point = checkpoint.resume_point(ckpt_dir, world) if resume else None
    engine, _, _, _ = deepspeed.initialize(model=task.module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=checkpoint.ds_config_for(point, stage_ds_config(ctx.ds_config, cfg)))
    dtype = next(p for p in engine.module.parameters()).dtype
    device = engine.device  # the batch follows the model onto this rank's accelerator

    # --- resume -----------------------------------------------------------------------------------
    first_epoch, global_step, stage_steps, skipped_total = 0, step_offset, 0, 0
    resumed_from = None
    history: dict[str, list] = {}
    if point is not None:
        loaded = checkpoint.load(engine, point)
        state = loaded["hsft"]
        if state.get("stage") != task.name or state.get("seed") != seed:
            raise BadValue(f"{point.path}: checkpoint of stage {state.get('stage')!r} seed {state.get('seed')}, "
                             f"cannot resume stage {task.name!r} seed {seed}")
        first_epoch, global_step = state["epoch"], state["global_step"]
        stage_steps, skipped_total = state["stage_steps"], state["skipped_steps"]
        resumed_from = str(point.path)
        history = state.get("history", {})
        # TensorBoard hides what the interrupted run logged after this checkpoint; what it logged before
        # stays, so every step appears once.
        tb.purge_from(global_step + 1)
        if not loaded["hsft_rng_restored"]:
            # A rank the checkpoint has no RNG state for (it was written by fewer ranks) starts a fresh stream
            # derived from the run seed, its rank and the epoch: see rng_state.seed_for_new_rank.
            _seed_everything(rng_state.seed_for_new_rank(seed, rank, first_epoch))
        new_ranks = distributed.any_rank(not loaded["hsft_rng_restored"])
        # The schedule counts optimizer steps; with another global batch an epoch has another number of them,
        # so the schedule continues from this epoch boundary's place in the new count.
        saved_steps_per_epoch = stage_steps // first_epoch if first_epoch else steps_per_epoch
        if saved_steps_per_epoch != steps_per_epoch:
            move_to_step(scheduler, first_epoch * steps_per_epoch)
        if distributed.is_main():
            print(f"[{task.name}] resumed from {resumed_from}: epoch {first_epoch}/{cfg.epochs} done, "
                  f"step {stage_steps}/{total_steps} of this stage")
            if point.ranks_changed or new_ranks:
                print(_rank_change_note(task.name, point, state, global_batch, saved_steps_per_epoch,
                                        steps_per_epoch, new_ranks))

    trainable = checkpoint.trainable_names(engine)

    def client_state(epoch_done: int) -> dict[str, Any]:
        # Namespaced: DeepSpeed keeps keys such as skipped_steps / global_steps for itself.
        return {"hsft": {"stage": task.name, "epoch": epoch_done, "global_step": global_step,
                         "stage_steps": stage_steps, "skipped_steps": skipped_total, "seed": seed,
                         "world_size": world, "global_batch": global_batch, **task.client_state(),
                         # The stage's record so far: a resumed stage reports every step, not only its own.
                         "history": {"losses": result.losses, "grad_norms": result.grad_norms,
                                     "epoch_metrics": result.epoch_metrics, "skipped": result.skipped}},
                "hsft_trainable": trainable}

    result = TrainResult(global_step=global_step, optimizer_steps=stage_steps, skipped_steps=skipped_total,
                         resumed_from=resumed_from, losses=list(history.get("losses", [])),
                         grad_norms=list(history.get("grad_norms", [])),
                         epoch_metrics=list(history.get("epoch_metrics", [])), skipped=list(history.get("skipped", [])))
    consecutive_skips = 0
    progress = tqdm(total=total_steps, initial=first_epoch * steps_per_epoch, desc=f"{task.name}",
                    unit="step", disable=not distributed.is_main(), dynamic_ncols=True)

    for epoch in range(first_epoch, cfg.epochs):
        engine.train()
        epoch_start = time.time()
        # A task may plan its own epochs (a curriculum, sampling with replacement); by default a seeded shuffle.
        planned = getattr(task, "epoch_order", None)
        order = planned(epoch, global_batch, seed) if planned else epoch_order(len(task), global_batch, seed, epoch)
        # Global micro-step k covers order[k*mb*world : (k+1)*mb*world]; this rank takes its slice of it.
        micro_steps = len(order) // (cfg.micro_batch * world)
        window_losses: list[float] = []
        window_terms: dict[str, list[float]] = {}
        window_nonfinite = False
        window_ids: list[str] = []  # this rank's samples in the current accumulation window
        nonfinite_ids: list[str] = []  # those of them whose micro-batch gave a non-finite loss
        window_start = time.time()
        for micro in range(micro_steps):
            start = micro * cfg.micro_batch * world + rank * cfg.micro_batch
            indices = order[start:start + cfg.micro_batch]
            batch = task.make_batch(indices, dtype, device)
            loss, terms = engine(batch)
            ids = sample_ids(task, indices)
            window_ids += ids

            # Log before backward: engine.backward divides by the accumulation steps itself.
            value = float(loss.detach())
            window_losses.append(value)
            for name, term in terms.items():
                window_terms.setdefault(name, []).append(float(term))
            if not math.isfinite(value):
                # Make the gradients non-finite on purpose so DeepSpeed's overflow check skips the whole
                # accumulation window on every rank (a finite-looking partial step would be worse).
                window_nonfinite = True
                nonfinite_ids += ids
                loss = loss * float("nan")
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            skipped_before = engine.skipped_steps
            engine.step()
            if not boundary:
                continue

            # --- one optimizer step happened (or was skipped) ---------------------------------
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            # Agreed on by every rank, so all of them take the same branch (and the same collectives) below.
            window_nonfinite = distributed.any_rank(window_nonfinite)
            skipped = engine.skipped_steps > skipped_before or window_nonfinite or not math.isfinite(grad_norm)
            global_step += 1
            stage_steps += 1
            # Log the global batch's loss, not this rank's share of it.
            names = sorted(window_terms)
            reduced = distributed.mean_over_ranks(
                [sum(window_losses) / len(window_losses)] + [sum(window_terms[k]) / len(window_terms[k]) for k in names])
            mean_loss, term_means = reduced[0], dict(zip(names, reduced[1:]))
            result.losses.append(mean_loss)
            result.grad_norms.append(grad_norm)
            if skipped:
                skipped_total += 1
                consecutive_skips += 1
                gathered = distributed.all_gather_objects((nonfinite_ids, window_ids))
                bad = [i for part, _ in gathered for i in part]
                reason = "non-finite loss" if bad else "non-finite gradient"
                named = bad or [i for _, part in gathered for i in part]
                result.skipped.append({"step": global_step, "epoch": epoch + 1, "reason": reason, "samples": named})
                if distributed.is_main():
                    where = "in the micro-batch of" if bad else "in the accumulation window of"
                    progress.write(f"[{task.name}] step {global_step} skipped: {reason} {where} sample(s) "
                                   f"{', '.join(named)} (loss {mean_loss}, grad norm {grad_norm})")
            else:
                consecutive_skips = 0
            if global_step % cfg.log_every == 0 or skipped:
                elapsed = max(time.time() - window_start, 1e-9)
                scalars = {f"{task.name}/loss": mean_loss, f"{task.name}/lr": scheduler.get_last_lr()[0],
                           f"{task.name}/grad_norm": grad_norm, f"{task.name}/skipped_steps": skipped_total,
                           f"{task.name}/samples_per_s": global_batch / elapsed, f"{task.name}/epoch": epoch}
                scalars.update({f"{task.name}/{k}": v for k, v in term_means.items()})
                tb.scalars(scalars, global_step)
            progress.set_postfix(loss=f"{mean_loss:.4f}", gnorm=f"{grad_norm:.3g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            progress.update(1)
            if consecutive_skips >= cfg.max_nonfinite_steps:
                progress.close()
                # The unfinished epoch is not saved: its weights, moments and schedule are what led here,
                # and resuming from them would replay the same state. The resume point stays the last
                # epoch boundary that completed.
                last_good = checkpoint.latest_tag(ckpt_dir)
                resume_point = (f"--resume restarts from the last good epoch boundary, {ckpt_dir / last_good}"
                                if last_good else "no epoch of this stage finished, so --resume restarts the stage "
                                                  "from its start")
                samples = sorted({i for entry in result.skipped[-consecutive_skips:] for i in entry["samples"]})
                raise NonFiniteTrainingError(
                    f"stage {task.name}: {consecutive_skips} optimizer steps in a row had a non-finite loss or "
                    f"gradient norm (last loss {mean_loss}, grad norm {grad_norm}) at step {global_step}, samples "
                    f"{', '.join(samples)}; the unfinished epoch was not saved: {resume_point}. Lower the learning "
                    "rate or check those samples.")
            window_losses, window_terms, window_nonfinite = [], {}, False
            window_ids, nonfinite_ids = [], []
            window_start = time.time()

        # --- end of epoch: metrics, checkpoint ---------------------------------------------------
        train_seconds = time.time() - epoch_start
        engine.eval()
        with torch.no_grad():
            metrics = task.evaluate(engine.module)
        engine.train()
        result.epoch_metrics.append({"epoch": epoch + 1, "train_seconds": train_seconds, **metrics})
        tb.scalars({f"{task.name}/epoch_{k}": v for k, v in metrics.items()}, global_step)
        if metrics and distributed.is_main():
            line = (f"[{task.name}] epoch {epoch + 1}/{cfg.epochs} "
                    + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            # The last epoch's metrics as a line of their own; the others on the progress bar (all with --verbose).
            if is_verbose() or epoch + 1 == cfg.epochs:
                progress.write(line)
            else:
                progress.set_description(line.removeprefix("[").replace("]", "", 1))
        tb.flush()  # what TensorBoard shows up to this checkpoint survives a kill
        checkpoint.save(engine, ckpt_dir, f"epoch{epoch + 1:04d}", client_state(epoch + 1), keep=ctx.keep_checkpoints)

    progress.close()
    tb.flush()
    result.global_step, result.optimizer_steps, result.skipped_steps = global_step, stage_steps, skipped_total
    result.seconds = time.time() - start_time
    task.module = engine.module
    result.last_lr, result.engine = scheduler.get_last_lr()[0], engine
    if distributed.is_main():
        trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        state = checkpoint.fp32_weights(ckpt_dir)
        result.weights = {name: state[name].contiguous() for name in sorted(trainable)}
    distributed.barrier()
    return result
