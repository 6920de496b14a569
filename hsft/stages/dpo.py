"""Stage 2, DPO on masks: teach the mask path to prefer the ground-truth mask over the model's own
prediction, relative to a frozen reference (the stage-1 model).

Pairs come from the inference path: each training sample goes through `generate_seg` (what a user
runs); chosen = the ground truth, rejected = the predicted binary mask (upsampled logits > 0). A pair
is kept only when the prediction's Dice (at original resolution, inside the FOV, as mining measures
it) is below `pair_threshold`: a nearly perfect prediction is no useful "rejected" example. Each pair
records margin = 1 - Dice, used by the optional target-margin term.

Policy: text_hidden_fcs + the SAM2 mask decoder train; the vision encoder, the LLM and the SAM2
image encoder are frozen, so the SAM2 features and the [SEG] hidden state of a sample are computed
once (FeatureCache) and the reference never changes: its log-likelihoods are computed once, before
training, from the same cached inputs, and no second model copy is kept.

Logged per optimizer step (prefixed "dpo/"): loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; per epoch: the validation Dice of
the inference path. `<out>/dpo/pairs.json` lists every training sample's Dice and whether it became a
pair. If no pair survives the threshold the stage says so, copies its input model as its output and
trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hsft.config import DPOStageConfig
from hsft.data import Sample
from hsft.data.batches import chunks
from hsft.engine import distributed
from hsft.engine.context import RunContext
from hsft.engine.files import write_json
from hsft.eval.inference import generate_and_score
from hsft.model import Sa2VAModel, load_model
from hsft.model.modes import eval_mode
from hsft.stages.mask_dpo import dpo_loss, mask_pair_logps
from hsft.stages.objective import FeatureCache
from hsft.stages.report import dpo_evidence
from hsft.stages.training import StageResult, Validation, model_dir, pass_model_on, train_stage

__all__ = ["TRAINABLE", "MaskPair", "PairBatch", "MaskDPOObjective", "DPOTask", "inference_pairs", "run"]

TRAINABLE = {"text_hidden_fcs", "mask_decoder"}
# Where [SEG] sits in the teacher-forced input whose hidden state the policy decodes: in the response,
# as the model generates it.
SEG_FORM = "response"


@dataclass
class MaskPair:
    """A training sample with the model's own (rejected) prediction of it."""

    sample: Sample
    rejected: np.ndarray  # (H, W) bool at the sample's original size
    dice: float  # Dice of `rejected` against the ground truth, inside the FOV
    seg_emitted: bool  # False: generation produced no [SEG], the rejected mask is empty

    @property
    def margin(self) -> float:
        return 1.0 - self.dice


@dataclass
class PairBatch:
    """A micro-batch of pairs: cached frozen inputs of the policy, both masks, the reference's logps."""

    ids: list[str]
    sam_features: object  # hsft.model.SamFeatures
    seg_hidden: torch.Tensor  # (B, H)
    chosen: list[torch.Tensor]  # (H_i, W_i) bool
    rejected: list[torch.Tensor]
    fovs: list[torch.Tensor | None]  # where the data have a field of view, only its pixels count
    reference_chosen: torch.Tensor  # (B,) float32
    reference_rejected: torch.Tensor
    margin: torch.Tensor  # (B,) 1 - Dice


class MaskDPOObjective(nn.Module):
    """forward(PairBatch) -> (mean DPO loss, the DPO terms users know)."""

    def __init__(self, model: Sa2VAModel, cfg: DPOStageConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def logps(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.decode_masks(batch.sam_features, batch.seg_hidden)
        return mask_pair_logps(logits, batch.chosen, batch.rejected, normalisation=self.cfg.normalisation,
                               fovs=batch.fovs)

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_chosen, policy_rejected = self.logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, batch.reference_chosen.to(policy_chosen),
            batch.reference_rejected.to(policy_rejected), beta=self.cfg.beta, loss_type=self.cfg.loss,
            label_smoothing=self.cfg.label_smoothing, margin=batch.margin, margin_weight=self.cfg.margin_weight)
        terms = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        return losses.mean(), terms


def inference_pairs(model: Sa2VAModel, samples: list[Sample], *, pair_threshold: float, batch_size: int,
                    max_new_tokens: int) -> tuple[list[MaskPair], list[MaskPair]]:
    """(kept pairs, every sample's pair) from the generate path, in the order of `samples`.

    The one inference pass (sharded over ranks and gathered) provides every sample's Dice and predicted
    mask, so every rank holds every pair (any rank may be handed any pair by the loop).
    """
    scored = generate_and_score(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                desc="dpo pairs", keep_masks=True)
    pairs = [MaskPair(sample, s.mask(sample.size), s.dice, s.seg_emitted) for sample, s in zip(samples, scored)]
    return [p for p in pairs if p.dice < pair_threshold], pairs


class DPOTask:
    """The mask-DPO stage as a TrainTask. Build it with the model already in the training dtype: the
    reference log-likelihoods are computed here, in that dtype, so that at step 0 policy == reference
    exactly (rewards 0, sigmoid loss log 2)."""

    name = "dpo"

    def __init__(self, model: Sa2VAModel, pairs: list[MaskPair], cfg: DPOStageConfig, validation: Validation, *,
                 reference_batch: int = 8):
        if not pairs:
            raise ValueError("dpo: no preference pairs (no training prediction has Dice < pair_threshold)")
        self.model, self.pairs, self.cfg, self.validation = model, pairs, cfg, validation
        self.reference_batch = reference_batch
        model.set_trainable(TRAINABLE)
        self.module = MaskDPOObjective(model, cfg)
        self.cache = FeatureCache(model, SEG_FORM)
        self.dtype = next(model.parameters()).dtype
        self.reference = self._reference_logps(reference_batch)

    @torch.no_grad()
    def _reference_logps(self, batch_size: int) -> dict[str, tuple[float, float]]:
        """log ref(chosen), log ref(rejected) per pair: the frozen stage-1 weights, evaluated once."""
        reference: dict[str, tuple[float, float]] = {}
        with eval_mode(self.module):
            for chunk in chunks(self.pairs, batch_size):
                cached = self.cache.batch([p.sample for p in chunk], self.dtype, self.model.device)
                logits = self.model.decode_masks(cached.sam_features, cached.seg_hidden)
                rejected_masks = [torch.from_numpy(p.rejected).to(logits.device) for p in chunk]
                chosen, rejected = mask_pair_logps(logits, cached.masks, rejected_masks,
                                                   normalisation=self.cfg.normalisation, fovs=cached.fovs)
                for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                    reference[pair.sample.id] = (c, r)
        return reference

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_ids(self, indices: list[int]) -> list[str]:
        return [self.pairs[i].sample.id for i in indices]

    def make_batch(self, indices: list[int], dtype: torch.dtype, device: torch.device) -> PairBatch:
        chunk = [self.pairs[i] for i in indices]
        cached = self.cache.batch([p.sample for p in chunk], dtype, device)
        reference = [self.reference[p.sample.id] for p in chunk]
        return PairBatch(
            ids=cached.ids, sam_features=cached.sam_features, seg_hidden=cached.seg_hidden, chosen=cached.masks,
            rejected=[torch.from_numpy(p.rejected).to(device) for p in chunk], fovs=cached.fovs,
            reference_chosen=torch.tensor([c for c, _ in reference], dtype=torch.float32, device=device),
            reference_rejected=torch.tensor([r for _, r in reference], dtype=torch.float32, device=device),
            margin=torch.tensor([p.margin for p in chunk], dtype=torch.float32, device=device),
        )

    @torch.no_grad()
    def pair_metrics(self, module) -> dict[str, float]:
        """The DPO loss, reward accuracy (chosen reward > rejected reward) and mean reward margin of
        `module` over every training pair, in eval mode: before training the loss is log 2 and the
        accuracy 0 (policy = reference), so these say whether the stage learned its preference."""
        dtype = next(module.parameters()).dtype
        totals = {"pair_loss": 0.0, "pair_reward_accuracy": 0.0, "pair_reward_margin": 0.0}
        with eval_mode(module):
            for indices in chunks(range(len(self.pairs)), max(1, self.reference_batch)):
                loss, terms = module(self.make_batch(list(indices), dtype, self.model.device))
                totals["pair_loss"] += float(loss) * len(indices)
                totals["pair_reward_accuracy"] += float(terms["rewards/accuracies"]) * len(indices)
                totals["pair_reward_margin"] += float(terms["rewards/margins"]) * len(indices)
        return {key: value / len(self.pairs) for key, value in totals.items()}

    def evaluate(self, module) -> dict[str, float]:
        return {**self.validation(module.model), **self.pair_metrics(module)}

    def client_state(self) -> dict:
        return {"pair_ids": [p.sample.id for p in self.pairs]}


def _write_pairs(path: Path, kept: list[MaskPair], every: list[MaskPair], threshold: float) -> None:
    kept_ids = {p.sample.id for p in kept}
    rows = [{"id": p.sample.id, "dice": p.dice, "margin": p.margin, "seg_emitted": p.seg_emitted,
             "pair": p.sample.id in kept_ids} for p in every]
    write_json(path, {"pair_threshold": threshold, "pairs": len(kept), "samples": len(every), "rows": rows})


def run(ctx: RunContext, cfg: DPOStageConfig, start: Path | None) -> StageResult:
    """Stage 2 from the model directory `start` (stage 1's model/)."""
    if start is None:
        raise ValueError("dpo: needs a starting model directory (--model, or an earlier stage)")
    start = Path(start)
    stage_dir = ctx.stage_dir("dpo")
    # Pairs come from the inference path in the training dtype on this rank's device, and the reference
    # log-likelihoods are computed in that dtype too, so that at step 0 the policy is the reference
    # exactly (loading in the dtype also gives the buffers the parameters' dtype, which DeepSpeed's own
    # bf16 cast, parameters only, does not).
    model = load_model(start, device=ctx.device, dtype=ctx.dtype)
    kept, every = inference_pairs(model, ctx.splits.train, pair_threshold=cfg.pair_threshold,
                                  batch_size=ctx.inference.batch_size, max_new_tokens=ctx.inference.max_new_tokens)
    _write_pairs(stage_dir / "pairs.json", kept, every, cfg.pair_threshold)
    summary = {"pairs": len(kept), "samples": len(every), "pair_threshold": cfg.pair_threshold,
               "loss": cfg.loss, "beta": cfg.beta, "normalisation": cfg.normalisation}
    if distributed.is_main():
        print(f"[dpo] {len(kept)} of {len(every)} training predictions have Dice < {cfg.pair_threshold}: "
              f"{len(kept)} preference pairs")
    if not kept:
        reason = (f"no preference pair: every training prediction has Dice >= pair_threshold {cfg.pair_threshold}; "
                  "DPO skipped, the input model is passed on unchanged (raise --dpo-pair-threshold to train)")
        return pass_model_on(ctx, "dpo", start, reason, summary)

    task = DPOTask(model, kept, cfg, Validation.of(ctx), reference_batch=ctx.inference.batch_size)
    trained = train_stage(ctx, task, cfg.train, load_input_model=lambda: load_model(start, dtype="float32"),
                          input_dir=start)
    final = trained.epoch_metrics[-1] if trained.epoch_metrics else task.pair_metrics(task.module)
    summary.update(skipped=False, optimizer_steps=trained.optimizer_steps, epochs=trained.epoch_metrics,
                   pair_loss=final["pair_loss"], pair_reward_accuracy=final["pair_reward_accuracy"],
                   pair_reward_margin=final["pair_reward_margin"], last_step_loss=trained.losses[-1])
    if distributed.is_main():
        print("[dpo]" + dpo_evidence(summary).removeprefix("  -"))
    return StageResult(model_dir=model_dir(stage_dir), summary=summary, global_step=trained.global_step)
