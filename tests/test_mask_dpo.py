"""The mask-DPO losses (hsft/stages/mask_dpo.py): each loss against a hand computation, the mask
log-likelihood normalisations, and a toy preference problem."""

from __future__ import annotations

import math

import pytest
import torch

from hsft.config import DPO_LOSSES, DPOStageConfig
from hsft.stages.mask_dpo import dpo_loss, mask_pair_logps


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_loss(loss_type: str, pc, pr, rc, rr, beta, eps=0.0, offset=0.0) -> float:
    """The published formulas written out in plain floats."""
    h = beta * ((pc - rc) - (pr - rr)) - offset
    if loss_type == "sigmoid":
        return -math.log(_sigmoid(h))
    if loss_type == "ipo":
        return ((pc - rc) - (pr - rr) - offset / beta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1.0 - h)
    return ((1 - eps) * -math.log(_sigmoid(h)) - eps * -math.log(_sigmoid(-h))) / (1 - 2 * eps)


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_each_loss_equals_the_hand_computation(loss_type):
    pc = [-0.20, -1.50, -0.70]
    pr = [-0.90, -0.40, -0.70]
    rc = [-0.50, -1.00, -0.60]
    rr = [-0.60, -0.80, -0.90]
    margin = [0.3, 0.8, 0.05]
    beta, eps = 0.7, 0.2
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    for margin_weight in (0.0, 0.5):
        smoothing = eps if loss_type == "robust" else 0.0
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type=loss_type, label_smoothing=smoothing,
            margin=t(margin), margin_weight=margin_weight)
        expected = [_hand_loss(loss_type, *vals, beta, smoothing, margin_weight * m)
                    for *vals, m in zip(pc, pr, rc, rr, margin)]
        assert losses.tolist() == pytest.approx(expected, rel=1e-12)
        assert chosen_rewards.tolist() == pytest.approx([beta * (a - b) for a, b in zip(pc, rc)])
        assert rejected_rewards.tolist() == pytest.approx([beta * (a - b) for a, b in zip(pr, rr)])
    # hinge is flat past the margin and IPO is zero exactly at its target gap 1 / (2 beta)
    if loss_type == "hinge":
        assert dpo_loss(t([3.0]), t([0.0]), t([0.0]), t([0.0]), beta=1.0, loss_type="hinge")[0].item() == 0.0
    if loss_type == "ipo":
        at_target = dpo_loss(t([1.0 / (2 * beta)]), t([0.0]), t([0.0]), t([0.0]), beta=beta, loss_type="ipo")
        assert at_target[0].item() == pytest.approx(0.0, abs=1e-12)


def test_bad_loss_arguments_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="margin"):
        dpo_loss(x, x, x, x, beta=0.1, margin_weight=1.0)
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="dpo.label_smoothing"):
        DPOStageConfig(loss="ipo", label_smoothing=0.1).validate()
    DPOStageConfig(loss="robust", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="normalisation"):
        mask_pair_logps(torch.zeros(1, 2, 2), [torch.zeros(2, 2, dtype=torch.bool)] * 1,
                        [torch.zeros(2, 2, dtype=torch.bool)], normalisation="median")


def test_sigmoid_loss_is_log2_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 4, generator=g)
    chosen = [torch.rand(8, 8, generator=g) > 0.5 for _ in range(3)]
    rejected = [torch.rand(8, 8, generator=g) > 0.5 for _ in range(3)]
    for normalisation in ("mean", "sum", "disagree"):
        pc, pr = mask_pair_logps(logits, chosen, rejected, normalisation=normalisation)
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
        assert losses.tolist() == pytest.approx([math.log(2.0)] * 3, rel=1e-7)
        assert chosen_rewards.abs().max().item() == 0.0 and rejected_rewards.abs().max().item() == 0.0


def test_normalisations_behave_as_documented():
    # A constant logit l upsamples to a constant map of any size, so the log-likelihoods have a closed
    # form: each foreground pixel contributes log sigmoid(l), each background pixel log sigmoid(-l).
    l = 0.8
    logits = torch.full((1, 4, 4), l)
    chosen = torch.zeros(8, 8, dtype=torch.bool)
    chosen[:3] = True  # 24 foreground pixels
    rejected = torch.zeros(8, 8, dtype=torch.bool)
    rejected[2:7] = True  # 40 foreground; they disagree on rows 0, 1 (8 + 8) and rows 3..6 (32)
    pos, neg = math.log(_sigmoid(l)), math.log(_sigmoid(-l))
    logps = {n: mask_pair_logps(logits, [chosen], [rejected], normalisation=n) for n in ("sum", "mean", "disagree")}
    assert logps["sum"][0].item() == pytest.approx(24 * pos + 40 * neg, rel=1e-6)
    assert logps["sum"][1].item() == pytest.approx(40 * pos + 24 * neg, rel=1e-6)
    assert logps["mean"][0].item() == pytest.approx((24 * pos + 40 * neg) / 64, rel=1e-6)
    # disagree: only the 48 disputed pixels (16 where chosen says vessel, 32 where rejected does)
    assert logps["disagree"][0].item() == pytest.approx((16 * pos + 32 * neg) / 48, rel=1e-6)
    assert logps["disagree"][1].item() == pytest.approx((16 * neg + 32 * pos) / 48, rel=1e-6)
    # the preference gap: agreeing pixels cancel, so sum == disagree * #disputed and mean == sum / #pixels
    gap = {n: (c - r).item() for n, (c, r) in logps.items()}
    assert gap["sum"] == pytest.approx(48 * gap["disagree"], rel=1e-6)
    assert gap["mean"] == pytest.approx(gap["sum"] / 64, rel=1e-6)
    # per disputed pixel the log-ratio of chosen over rejected is +l or -l: (16 l - 32 l) / 48
    assert gap["disagree"] == pytest.approx((16 * l - 32 * l) / 48, rel=1e-6)
    # identical masks give no signal (and no division by zero)
    same = mask_pair_logps(logits, [chosen], [chosen.clone()], normalisation="disagree")
    assert same[0].item() == same[1].item() == 0.0
    # samples of different sizes in one batch, each at its own resolution
    mixed = mask_pair_logps(torch.full((2, 4, 4), l), [chosen, torch.ones(5, 7, dtype=torch.bool)],
                            [rejected, torch.zeros(5, 7, dtype=torch.bool)], normalisation="mean")
    assert mixed[0][1].item() == pytest.approx(pos, rel=1e-6) and mixed[1][1].item() == pytest.approx(neg, rel=1e-6)


def test_a_few_steps_on_a_toy_problem_raise_reward_accuracy():
    """A shared linear 'decoder' from per-sample features to 4x4 logits; rejected = its own initial
    binary prediction, chosen = a ground truth from another map. DPO must learn to rank them."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(16, 8, generator=g)
    truth_map = torch.randn(8, 64, generator=g)
    chosen = [(f @ truth_map).reshape(8, 8) > 0 for f in features]
    decoder = torch.nn.Linear(8, 16)
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(16, 8, generator=g))
        decoder.bias.zero_()

    def logits():
        return decoder(features).reshape(-1, 4, 4)

    with torch.no_grad():
        init = logits()
        rejected = [m > 0 for m in torch.nn.functional.interpolate(init[:, None], size=(8, 8), mode="bilinear",
                                                                   align_corners=False)[:, 0]]
        ref_c, ref_r = mask_pair_logps(init, chosen, rejected, normalisation="disagree")

    def accuracy_and_loss():
        pc, pr = mask_pair_logps(logits(), chosen, rejected, normalisation="disagree")
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, ref_c, ref_r, beta=0.5)
        return (chosen_rewards > rejected_rewards).float().mean().item(), losses.mean()

    first_accuracy, first_loss = accuracy_and_loss()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.05)
    for _ in range(10):
        _, loss = accuracy_and_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last_accuracy, last_loss = accuracy_and_loss()
    assert first_accuracy == 0.0 and first_loss.item() == pytest.approx(math.log(2.0))
    assert last_accuracy >= 0.9 and last_loss.item() < 0.9 * math.log(2.0)


def test_pixels_outside_the_field_of_view_do_not_count():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 4, generator=g)
    chosen, rejected = torch.rand(8, 8, generator=g) > 0.5, torch.rand(8, 8, generator=g) > 0.5
    fov = torch.zeros(8, 8, dtype=torch.bool)
    fov[2:6, 1:7] = True
    for normalisation in ("mean", "sum", "disagree"):
        base = mask_pair_logps(logits, [chosen], [rejected], normalisation=normalisation, fovs=[fov])
        outside_changed = mask_pair_logps(logits, [torch.where(fov, chosen, ~chosen)], [rejected],
                                          normalisation=normalisation, fovs=[fov])
        torch.testing.assert_close(base, outside_changed)
        inside_changed = mask_pair_logps(logits, [torch.where(fov, ~chosen, chosen)], [rejected],
                                         normalisation=normalisation, fovs=[fov])
        assert not torch.allclose(base[0], inside_changed[0])
    # no field of view: the same as a field of view covering the image
    torch.testing.assert_close(mask_pair_logps(logits, [chosen], [rejected], fovs=[None]),
                               mask_pair_logps(logits, [chosen], [rejected], fovs=[torch.ones(8, 8, dtype=torch.bool)]))
