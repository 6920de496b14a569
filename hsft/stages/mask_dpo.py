"""The mask-DPO losses of stage 2: the log-likelihood of a binary mask under the mask decoder, and the
preference losses built on it. Their names (`DPO_LOSSES`, `DPO_NORMALISATIONS`) live in hsft.config,
where the options are validated."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsft.config import DPO_LOSSES, DPO_NORMALISATIONS

__all__ = ["mask_pair_logps", "dpo_loss"]


def mask_pair_logps(logits: torch.Tensor, chosen: list[torch.Tensor], rejected: list[torch.Tensor], *,
                    normalisation: str = "mean", fovs: list[torch.Tensor | None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihoods log pi(y|x) of the chosen and the rejected mask of each sample, shape (B,) each.

    The decoder defines a per-pixel Bernoulli: pixel j is foreground with probability sigmoid(l_j),
    l = the low-resolution logits upsampled to the mask's size (bilinear, align_corners=False, as
    everywhere). So log pi(y|x) = sum_j [y_j log sigmoid(l_j) + (1 - y_j) log sigmoid(-l_j)]
    = -sum_j BCE(l_j, y_j), then normalised:

    - "sum": the exact log-likelihood. It grows with the image size, and so does every DPO reward
      built on it: beta then scales a sum over pixels, and a fixed beta means something different on
      a 64x64 and a 565x584 image.
    - "mean" (default): divided by the number of pixels, i.e. the mean per-pixel log-likelihood.
      Resolution independent; beta scales an image-average.
    - "disagree": only the pixels where chosen and rejected differ, divided by their number. Where
      the two masks agree their per-pixel terms are identical, so they cancel exactly in the DPO
      difference (log pi(chosen) - log pi(rejected)); "sum" and "disagree" therefore give the same
      preference signal up to the factor 1 / #disagreeing pixels, while "mean" dilutes it by the
      fraction of disagreeing pixels (small for a nearly-right prediction). The two returned values
      are then log-likelihoods of the disputed pixels only, not of the whole masks.

    Args:
        logits: (B, h, w) low-resolution mask logits, any floating dtype (computed in float32).
        chosen, rejected: B masks each, (H_i, W_i) bool (or {0, 1}), at each sample's original size.
        normalisation: one of DPO_NORMALISATIONS.
        fovs: per sample, an (H_i, W_i) bool field of view or None; only the pixels inside count (in
            every normalisation, "mean" then divides by the field of view's size), as in mining.

    Differentiable w.r.t. `logits`.
    """
    if normalisation not in DPO_NORMALISATIONS:
        raise ValueError(f"normalisation: must be one of {DPO_NORMALISATIONS}, got {normalisation!r}")
    if logits.ndim != 3:
        raise ValueError(f"logits: expected (B, h, w), got shape {tuple(logits.shape)}")
    if not (len(chosen) == len(rejected) == logits.shape[0]):
        raise ValueError(f"batch mismatch: {logits.shape[0]} logit maps, {len(chosen)} chosen and "
                         f"{len(rejected)} rejected masks")
    logp_chosen, logp_rejected = [], []
    for i, (good, bad) in enumerate(zip(chosen, rejected)):
        if good.shape != bad.shape or good.ndim != 2:
            raise ValueError(f"sample {i}: chosen {tuple(good.shape)} and rejected {tuple(bad.shape)} must be "
                             "two (H, W) masks of the same size")
        up = F.interpolate(logits[i][None, None].float(), size=tuple(good.shape), mode="bilinear",
                           align_corners=False)[0, 0]
        good = good.to(device=up.device, dtype=torch.float32)
        bad = bad.to(device=up.device, dtype=torch.float32)
        fov = fovs[i] if fovs is not None else None
        inside = torch.ones_like(up) if fov is None else fov.to(device=up.device, dtype=torch.float32)
        nll_good = F.binary_cross_entropy_with_logits(up, good, reduction="none") * inside
        nll_bad = F.binary_cross_entropy_with_logits(up, bad, reduction="none") * inside
        if normalisation == "disagree":
            region = (good != bad).float() * inside
            count = region.sum().clamp(min=1.0)  # identical masks: both 0, no preference signal
            logp_chosen.append(-(nll_good * region).sum() / count)
            logp_rejected.append(-(nll_bad * region).sum() / count)
        else:
            scale = 1.0 if normalisation == "sum" else 1.0 / inside.sum().clamp(min=1.0)
            logp_chosen.append(-nll_good.sum() * scale)
            logp_rejected.append(-nll_bad.sum() * scale)
    return torch.stack(logp_chosen), torch.stack(logp_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, margin: torch.Tensor | None = None,
             margin_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss on (B,) log-likelihoods of the policy and the frozen reference.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are detached.

    With the implicit rewards r_c = beta (log pi(c) - log ref(c)), r_r = beta (log pi(r) - log ref(r))
    and h = r_c - r_r - margin_weight * margin (the optional target margin, in reward units: a pair
    whose rejected mask was worse, i.e. a larger margin = 1 - Dice, must be separated further):

    - "sigmoid" (DPO):  -log sigmoid(h)                 (log 2 when policy == reference, no margin)
    - "ipo":            (h / beta - 1 / (2 beta))^2     (regresses the log-ratio gap to 1 / (2 beta))
    - "hinge" (SLiC):   max(0, 1 - h)
    - "robust" (rDPO):  ((1 - eps) (-log sigmoid(h)) - eps (-log sigmoid(-h))) / (1 - 2 eps),
                        an unbiased DPO loss when a fraction eps = label_smoothing of the
                        preferences is flipped.

    beta is the inverse temperature of the KL constraint to the reference: it converts log-likelihood
    gaps (in the units the normalisation gives them, see mask_pair_logps) into rewards, so the loss
    saturates once the policy's gap over the reference reaches a few 1 / beta.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type: must be one of {DPO_LOSSES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "robust":
        raise ValueError(f"label_smoothing: only the 'robust' loss uses it, got loss_type {loss_type!r}")
    if margin_weight < 0:
        raise ValueError(f"margin_weight: must be >= 0, got {margin_weight}")
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    h = chosen_rewards - rejected_rewards
    if margin_weight > 0:
        if margin is None:
            raise ValueError("margin: required when margin_weight > 0")
        h = h - margin_weight * margin.to(h)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(h)
    elif loss_type == "ipo":
        losses = (h / beta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - h)
    else:
        eps = label_smoothing
        losses = ((1.0 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1.0 - 2.0 * eps)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
