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

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hsft import metrics
from hsft.config import DPOStageConfig, MiningConfig, RunConfig
from hsft.data import Sample
from hsft.engine import distributed
from hsft.engine.loop import write_json
from hsft.losses import dpo_loss, mask_pair_logps
from hsft.model import Sa2VAModel
from hsft.ops import upsample_masks
from hsft.stages.mining import validation_metrics
from hsft.stages.objective import FeatureCache
from hsft.stages.runner import StageContext, model_dir, run_training_stage, training_dtype

__all__ = ["TRAINABLE", "MaskPair", "PairBatch", "MaskDPOObjective", "DPOTask", "inference_pairs", "run_dpo"]

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
        return mask_pair_logps(logits, batch.chosen, batch.rejected, normalisation=self.cfg.normalisation)

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


@torch.no_grad()
def inference_pairs(model: Sa2VAModel, samples: list[Sample], *, pair_threshold: float, batch_size: int,
                    max_new_tokens: int) -> tuple[list[MaskPair], list[MaskPair]]:
    """(kept pairs, every sample's pair) from the generate path, in the order of `samples`.

    The work is sharded over ranks and gathered, so every rank holds every pair (any rank may be
    handed any pair by the loop). Masks travel bit-packed.
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    mine = distributed.shard(samples)
    local: list[tuple[str, float, bool, bytes]] = []
    for start in tqdm(range(0, len(mine), batch_size), desc="dpo pairs", disable=not distributed.is_main(),
                      dynamic_ncols=True):
        chunk = mine[start:start + batch_size]
        generated = model.generate_seg(model.preprocess([s.image for s in chunk]).to(dtype=dtype),
                                       max_new_tokens=max_new_tokens)
        for i, sample in enumerate(chunk):
            predicted = upsample_masks(generated.mask_logits[i:i + 1].float(), sample.size, threshold=0.0)
            target = torch.from_numpy(sample.mask)[None]
            fov = torch.from_numpy(sample.fov)[None] if sample.fov is not None else None
            dice = float(metrics.dice_from_masks(predicted.cpu(), target, fov)[0])
            packed = np.packbits(predicted[0].cpu().numpy()).tobytes()
            local.append((sample.id, dice, bool(generated.seg_emitted[i]), packed))
    by_id = {row[0]: row for part in distributed.all_gather_objects(local) for row in part}
    pairs = []
    for sample in samples:
        _, dice, emitted, packed = by_id[sample.id]
        height, width = sample.size
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=height * width)
        pairs.append(MaskPair(sample, bits.reshape(height, width).astype(bool), dice, emitted))
    return [p for p in pairs if p.dice < pair_threshold], pairs


class DPOTask:
    """The mask-DPO stage as a TrainTask. Build it with the model already in the training dtype: the
    reference log-likelihoods are computed here, in that dtype, so that at step 0 policy == reference
    exactly (rewards 0, sigmoid loss log 2)."""

    name = "dpo"

    def __init__(self, model: Sa2VAModel, pairs: list[MaskPair], cfg: DPOStageConfig, val_samples: list[Sample],
                 mining: MiningConfig, *, reference_batch: int = 8):
        if not pairs:
            raise ValueError("dpo: no preference pairs (no training prediction has Dice < pair_threshold)")
        self.model, self.pairs, self.cfg = model, pairs, cfg
        self.val_samples, self.mining = val_samples, mining
        model.set_trainable(TRAINABLE)
        self.module = MaskDPOObjective(model, cfg)
        self.cache = FeatureCache(model, SEG_FORM)
        self.dtype = next(model.parameters()).dtype
        self.reference = self._reference_logps(reference_batch)

    @torch.no_grad()
    def _reference_logps(self, batch_size: int) -> dict[str, tuple[float, float]]:
        """log ref(chosen), log ref(rejected) per pair: the frozen stage-1 weights, evaluated once."""
        was_training = self.module.training
        self.module.eval()
        reference: dict[str, tuple[float, float]] = {}
        for start in range(0, len(self.pairs), batch_size):
            chunk = self.pairs[start:start + batch_size]
            cached = self.cache.batch([p.sample for p in chunk], self.dtype)
            logits = self.model.decode_masks(cached.sam_features, cached.seg_hidden)
            chosen, rejected = mask_pair_logps(logits, cached.masks, [torch.from_numpy(p.rejected) for p in chunk],
                                               normalisation=self.cfg.normalisation)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                reference[pair.sample.id] = (c, r)
        self.module.train(was_training)
        return reference

    def __len__(self) -> int:
        return len(self.pairs)

    def make_batch(self, indices: list[int], dtype: torch.dtype) -> PairBatch:
        chunk = [self.pairs[i] for i in indices]
        cached = self.cache.batch([p.sample for p in chunk], dtype)
        reference = [self.reference[p.sample.id] for p in chunk]
        return PairBatch(
            ids=cached.ids, sam_features=cached.sam_features, seg_hidden=cached.seg_hidden, chosen=cached.masks,
            rejected=[torch.from_numpy(p.rejected) for p in chunk],
            reference_chosen=torch.tensor([c for c, _ in reference], dtype=torch.float32),
            reference_rejected=torch.tensor([r for _, r in reference], dtype=torch.float32),
            margin=torch.tensor([p.margin for p in chunk], dtype=torch.float32),
        )

    def evaluate(self, module) -> dict[str, float]:
        """Validation Dice and [SEG] rate of the inference path (generate), as the final evaluation measures it."""
        return validation_metrics(module.model, self.val_samples, self.mining)

    def client_state(self) -> dict:
        return {"pair_ids": [p.sample.id for p in self.pairs]}


def _write_pairs(path: Path, kept: list[MaskPair], every: list[MaskPair], threshold: float) -> None:
    kept_ids = {p.sample.id for p in kept}
    rows = [{"id": p.sample.id, "dice": p.dice, "margin": p.margin, "seg_emitted": p.seg_emitted,
             "pair": p.sample.id in kept_ids} for p in every]
    write_json(path, {"pair_threshold": threshold, "pairs": len(kept), "samples": len(every), "rows": rows})


def run_dpo(cfg: RunConfig, ctx: StageContext, start: Path, splits) -> Path:
    """Stage 2 from the model directory `start` (stage 1's model/); returns this stage's model/."""
    if start is None:
        raise ValueError("dpo: needs a starting model directory (--start, or an earlier stage)")
    start = Path(start)
    stage_dir = ctx.stage_dir("dpo")
    model = Sa2VAModel.from_pretrained(str(start), dtype="float32")
    kept, every = inference_pairs(model, splits.train, pair_threshold=cfg.dpo.pair_threshold,
                                  batch_size=cfg.mining.batch_size, max_new_tokens=cfg.mining.max_new_tokens)
    _write_pairs(stage_dir / "pairs.json", kept, every, cfg.dpo.pair_threshold)
    summary = {"pairs": len(kept), "samples": len(every), "pair_threshold": cfg.dpo.pair_threshold,
               "loss": cfg.dpo.loss, "beta": cfg.dpo.beta, "normalisation": cfg.dpo.normalisation}
    if distributed.is_main():
        print(f"[dpo] {len(kept)} of {len(every)} training predictions have Dice < {cfg.dpo.pair_threshold}: "
              f"{len(kept)} preference pairs")

    if not kept:
        message = (f"no preference pair: every training prediction has Dice >= pair_threshold "
                   f"{cfg.dpo.pair_threshold}; DPO skipped, the input model is passed on unchanged "
                   "(raise --dpo-pair-threshold to train)")
        if distributed.is_main():
            print(f"[dpo] {message}")
            if model_dir(stage_dir).exists():
                shutil.rmtree(model_dir(stage_dir))
            shutil.copytree(start, model_dir(stage_dir))
            write_json(stage_dir / "metrics.json", {"stage": "dpo", "skipped": True, "reason": message,
                                                    "samples": 0, "optimizer_steps": 0,
                                                    "global_step_end": ctx.global_step, **summary})
        distributed.barrier()
        ctx.results["dpo"] = {**summary, "skipped": True, "reason": message}
        return model_dir(stage_dir)

    # The reference log-likelihoods are computed in the dtype the policy trains in, so that at step 0 the
    # policy is the reference exactly; casting here also gives the buffers the parameters' dtype, which
    # DeepSpeed's own bf16 cast (parameters only) does not.
    model = model.to(training_dtype(ctx))
    task = DPOTask(model, kept, cfg.dpo, splits.val, cfg.mining, reference_batch=cfg.mining.batch_size)
    result = run_training_stage(ctx, task, cfg.dpo.train,
                                load_input_model=lambda: Sa2VAModel.from_pretrained(str(start), dtype="float32"))
    ctx.results["dpo"] = {**summary, "skipped": False, "optimizer_steps": result["optimizer_steps"],
                          "epochs": result["epochs"]}
    return model_dir(stage_dir)

