"""Stage 3, Hard Sample Aware Fine-tuning: train text_hidden_fcs and the SAM2 mask decoder on the
mined hard set alone with Dice + 0.5 * BCE, the vision encoder and the LLM frozen.

What trains, exactly: every parameter of `text_hidden_fcs` and of the SAM2 mask decoder except its
two high-resolution feature convolutions `conv_s0` / `conv_s1`, which SAM2 applies to the image
encoder's features before the decoder proper: they are frozen so that the cached image features
are exact. Everything upstream of text_hidden_fcs (vision tower, projector, LLM, SAM2 image
encoder, prompt encoder) is frozen, so the SAM2 image features and the [SEG] hidden state of a
sample never change: they are computed once and reused every epoch (`cache_features`, on by
default; with it off the same parameters train, each batch recomputing its features, and
`train_feature_convs` may add conv_s0/conv_s1).

Every epoch end logs, next to the validation Dice, the mean loss over the hard set
(`hard_set_loss`), measured the same way before training (`hard_set_loss_before`): the evidence
that the stage lowered the loss it optimises. The matched-compute control (hsft.stages.variants)
is this stage on a random training subset of the hard set's size.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from hsft.config import HSFTStageConfig
from hsft.data import Sample
from hsft.data.batches import chunks
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.errors import BadValue
from hsft.model import load_model
from hsft.model.modes import eval_mode
from hsft.stages.mining import read_hard_ids, read_rule
from hsft.stages.batching import make_seg_batch
from hsft.stages.graphed_decode import GraphedDecode, freeze_unreached_by_the_loss
from hsft.stages.objective import FeatureCache, SegObjective, SegTask
from hsft.stages.report import fine_tune_evidence
from hsft.stages.selection import TrainingPlan, whole_set
from hsft.stages.training import StageResult, Validation, model_dir, pass_model_on, train_stage

TRAINABLE = {"text_hidden_fcs", "mask_decoder"}
TRAINS = ("text_hidden_fcs and the SAM2 mask decoder with its prompt encoder, except the decoder's conv_s0/conv_s1 "
          "(frozen: they make the cached image features)")
# The decoder's projections of the two high-resolution feature levels: part of the cacheable features.
FEATURE_CONVS = ("sam2.mask_decoder.conv_s0.", "sam2.mask_decoder.conv_s1.")
# Samples per forward when the loss over a whole set is measured (no gradients).
PROBE_BATCH = 8


class HSFTTask(SegTask):
    """text_hidden_fcs + mask decoder on Dice + BCE over `samples`. `probes` names sets whose mean
    loss is measured at every epoch end (e.g. {"hard_set": the hard set})."""

    def __init__(self, model, samples: list[Sample], cfg: HSFTStageConfig, validation: Validation, *,
                 name: str = "hsft", probes: dict[str, list[Sample]] | None = None, plan: TrainingPlan | None = None):
        self.name = name
        if not samples:
            raise BadValue(f"{name}: the hard set is empty (no training sample is below tau); raise --tau or "
                             "use --hard-quantile")
        super().__init__(model, samples, validation, form=cfg.seg_form)
        self.cfg = cfg
        # What each epoch visits; by default every sample once, shuffled.
        self.plan = plan or whole_set(samples, "the given samples")
        if self.plan.pool is not samples:
            raise ValueError(f"{name}: the training plan draws from another sample list than the task's")
        self.probes = probes or {}
        model.set_trainable(TRAINABLE)
        if cfg.train_feature_convs:
            for param_name, param in model.named_parameters():
                if param_name.startswith(FEATURE_CONVS):
                    param.requires_grad_(True)
        self.graphed = None
        if cfg.cuda_graph:
            freeze_unreached_by_the_loss(model)
            self.graphed = GraphedDecode(model)
        self.module = SegObjective(model, lm_weight=0.0, mask_weight=1.0, bce_weight=cfg.bce_weight, eps=cfg.dice_eps,
                                   cached_decode=self.graphed)
        self.cache = (FeatureCache(model, cfg.seg_form, on_device=cfg.cache_on_device,
                                   max_new_tokens=validation.max_new_tokens) if cfg.cache_features else None)

    def __len__(self) -> int:
        return self.plan.per_epoch

    def epoch_order(self, epoch: int, global_batch: int, seed: int) -> list[int]:
        return self.plan.order(epoch, global_batch, seed)

    def batch_of(self, samples: list[Sample], dtype: torch.dtype, device: torch.device):
        """The micro-batch of any samples (cached features when the cache is on)."""
        if self.cache is None:
            return make_seg_batch(self.model, samples, form=self.form, dtype=dtype, device=device)
        return self.cache.batch(samples, dtype, device)

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device):
        return self.batch_of([self.samples[i] for i in indices], dtype, device)

    @torch.no_grad()
    def set_loss(self, module, samples: list[Sample]) -> float:
        """Mean training loss of `module` over `samples` (eval mode, no gradients)."""
        params = next(p for p in module.parameters())
        total = 0.0
        with eval_mode(module):
            for chunk in chunks(samples, PROBE_BATCH):
                loss, _ = module(self.batch_of(chunk, params.dtype, params.device))
                total += float(loss) * len(chunk)
        return total / len(samples)

    def probe_losses(self, module) -> dict[str, float]:
        return {f"{label}_loss": self.set_loss(module, samples) for label, samples in self.probes.items() if samples}

    def evaluate(self, module) -> dict[str, float]:
        return {**self.validation(module.model), **self.probe_losses(module)}

    def client_state(self) -> dict:
        return {"hard_set_ids": [s.id for s in self.samples], "cache": self.cache is not None}


def hard_set(train: list[Sample], hard_ids: list[str], source: str = "hard_samples.json") -> list[Sample]:
    """The mined hard set, in mining order (hardest first); `source` names the file in errors."""
    by_id = {s.id: s for s in train}
    unknown = [i for i in hard_ids if i not in by_id]
    if unknown:
        raise BadValue(f"{source}: names {len(unknown)} id(s) that are not in the training split, e.g. "
                         f"{', '.join(unknown[:5])}; was it mined on other data?")
    return [by_id[i] for i in hard_ids]


def random_subset(train: list[Sample], size: int, seed: int) -> list[Sample]:
    """A seeded random training subset of `size` samples (the matched-compute control's training set)."""
    return random.Random(seed).sample(train, k=size)


def fine_tune(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None, *, name: str, title: str,
              plan: TrainingPlan, hard: list[Sample]) -> StageResult:
    """Train text_hidden_fcs + the mask decoder from `start` by `plan` into `<out>/<name>/`, with the hard
    set's loss measured before training and at every epoch end. HSFT and every variant beside it run this;
    `title` names the stage in messages."""
    if start is None:
        raise BadValue(f"{name}: needs a starting model directory (--model, or an earlier stage)")
    trains = (TRAINS if not cfg.train_feature_convs else
              "text_hidden_fcs and the SAM2 mask decoder with its prompt encoder, conv_s0/conv_s1 included")
    if cfg.cuda_graph:
        trains += ("; its IoU and object-score heads and unused prompt embeddings frozen (the loss never reaches "
                   "them); the decoder's forward and backward replayed as CUDA graphs")
    train_set = plan.pool
    what = plan.describe
    summary = {"samples": plan.per_epoch, "pool": len(train_set), "training_set": what, "cache": cfg.cache_features,
               "seg_form": cfg.seg_form, "trains": trains, "hard_set": len(hard)}
    if not train_set:
        # A model with no training sample below tau has nothing to fine-tune on: pass it on unchanged so
        # the evaluation still runs, and say so.
        reason = (f"no training sample to train on (the hard set: {read_rule(ctx.stage_dir('mining'))}); {title} "
                  "skipped, the input model is passed on unchanged (raise --tau or use --hard-quantile to train)")
        return pass_model_on(ctx, name, Path(start), reason, summary)
    probes = {"hard_set": hard}
    if train_set != hard:
        probes["train_set"] = train_set
    # In the training dtype up front: DeepSpeed's bf16 cast converts parameters, not buffers.
    task = HSFTTask(load_model(start, device=ctx.device, dtype=ctx.dtype), train_set, cfg, Validation.of(ctx),
                    name=name, probes=probes, plan=plan)
    before = task.probe_losses(task.module)
    trained = train_stage(ctx, task, cfg.train, load_input_model=lambda: load_model(start, dtype="float32"),
                          input_dir=start)
    # Epoch-end measurements of this process (a resumed stage has only the epochs it ran).
    epochs = trained.epoch_metrics or [{"epoch": cfg.train.epochs, **task.probe_losses(task.module)}]
    last = epochs[-1]
    summary.update(optimizer_steps=trained.optimizer_steps, hard_set_loss_before=before["hard_set_loss"],
                   hard_set_loss_by_epoch={e["epoch"]: e["hard_set_loss"] for e in epochs},
                   hard_set_loss_after=last["hard_set_loss"], epochs=trained.epoch_metrics)
    if task.cache is not None and task.cache.generate_fallbacks:
        summary["generate_fallbacks"] = task.cache.generate_fallbacks
    if "train_set_loss" in before:
        summary.update(train_set_loss_before=before["train_set_loss"], train_set_loss_after=last["train_set_loss"])
    if distributed.is_main():
        print(f"[{name}]" + fine_tune_evidence(summary).removeprefix("  -"))
    return StageResult(model_dir=model_dir(ctx.stage_dir(name)), summary=summary, global_step=trained.global_step)


def mined_hard_set(ctx: RunContext) -> list[Sample]:
    """The hard set the mining stage of this run wrote, hardest first."""
    return hard_set(ctx.splits.train, read_hard_ids(ctx.stage_dir("mining")),
                    source=str(ctx.stage_dir("mining") / "hard_samples.json"))


def run(ctx: RunContext, cfg: HSFTStageConfig, start: Path | None) -> StageResult:
    """Stage 3 from the model `start`, on the hard set that the mining stage wrote (or its hardest part)."""
    hard = mined_hard_set(ctx)
    used = cfg.limit(hard)
    what = ("the mined hard set" if len(used) == len(hard) else
            f"the {len(used)} hardest of the {len(hard)} mined hard samples")
    return fine_tune(ctx, cfg, start, name="hsft", title="HSFT", plan=whole_set(used, what), hard=hard)
