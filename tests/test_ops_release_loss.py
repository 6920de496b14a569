"""The mask loss of release-convention models in training: the fused op resizes the decoder's logits in
two steps (decoder size -> SAM2's input size -> image), never storing the 1024 x 1024 logits, and
gives the loss and gradients of the materialised path (resize to SAM2's input size, then the one-step
loss)."""

from __future__ import annotations

import dataclasses

import torch

from hsft.model import ModelConfig, build_model
from hsft.model.config import Conventions
from hsft.model.sa2va import Sa2VAModel
from hsft.stages.batching import mask_loss_per_sample
from hsft.stages.objective import CachedSegBatch, SegObjective


def release_convention_model() -> Sa2VAModel:
    base = build_model(ModelConfig())
    conventions = dataclasses.replace(Conventions(), mask_upsample="sam_input")
    return Sa2VAModel(base.vlm, base.sam2, base.tokenizer, base.prompt, conventions=conventions).float()


def test_release_convention_training_loss_resizes_in_two_steps_inside_the_op() -> None:
    model = release_convention_model()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, model.sam_image_size, model.sam_image_size, generator=gen)
    with torch.no_grad():
        feats = model.sam_features(images)
    hidden = torch.randn(3, model.hidden_size, generator=gen)
    masks = [torch.rand(37, 45, generator=gen) < 0.3 for _ in range(3)]
    fovs = [None, torch.rand(37, 45, generator=gen) < 0.8, None]
    batch = CachedSegBatch(ids=["a", "b", "c"], sam_features=feats, seg_hidden=hidden, masks=masks, fovs=fovs)

    objective = SegObjective(model, lm_weight=0.0, mask_weight=1.0)
    low_res = model.decode_masks(feats, hidden, at_decoder_size=True)
    assert tuple(low_res.shape[-2:]) == model.decoder_mask_size != model.mask_size
    assert model.loss_mid_size(low_res) == model.mask_size
    loss, terms = objective(batch)
    params = list(model.text_hidden_fcs.parameters())
    fused_grads = torch.autograd.grad(loss, params)

    materialised = model.decode_masks(feats, hidden)  # (B, 1024, 1024): what training computed before
    assert tuple(materialised.shape[-2:]) == model.mask_size and model.loss_mid_size(materialised) is None
    expected = mask_loss_per_sample(materialised, masks, fovs, bce_weight=0.5, eps=1e-8).mean()
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * want.abs().max().item())
    assert torch.isfinite(terms["dice_loss"])
