"""Trainable [SEG] rows of the input embedding and LM head (hsft.model.token_rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsft.model import ModelConfig, build_model
from hsft.model.checkpoint import load_model
from hsft.model.release import import_sa2va
from hsft.model.token_rows import attach_seg_rows, load_seg_rows_state, merge_seg_rows, seg_rows_state

from release_checkpoints import write_release, write_sam2_config


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    src, _ = write_release(root / "src", family="internlm2", dtype=torch.float32)
    import_sa2va(src, root / "model", sam2_config_file=write_sam2_config(root / "sam2.json"))
    return root / "model"


def _model(kind, untied_dir):
    return build_model(ModelConfig(preset="tiny"), seed=0) if kind == "tied" else load_model(str(untied_dir))


def _inputs(model):
    rng = np.random.default_rng(0)
    images = model.preprocess([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)])
    return images, model.tokenize(2, form="response")


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_seg_rows_train_alone_and_merge_exactly(kind, untied_dir):
    model = _model(kind, untied_dir).train()
    images, tokens = _inputs(model)
    embed, head = model.vlm.get_input_embeddings().weight, model.vlm.lm_head.weight
    assert (embed is head) == (kind == "tied")
    with torch.no_grad():
        before = model.forward_seg(images, tokens, compute_lm_loss=True)
    model.set_trainable({"text_hidden_fcs"})
    rows = attach_seg_rows(model)
    assert rows.tied == (kind == "tied")
    assert all(p.requires_grad for p in rows.parameters())
    assert any(p is rows.input_rows for p in model.trainable_groups()["llm"])
    with torch.no_grad():
        same = model.forward_seg(images, tokens, compute_lm_loss=True)
    torch.testing.assert_close(same.lm_logits, before.lm_logits)
    torch.testing.assert_close(same.mask_logits, before.mask_logits)

    out = model.forward_seg(images, tokens, compute_lm_loss=True)
    (out.lm_loss + out.mask_logits.float().mean()).backward()
    assert embed.grad is None and head.grad is None  # the tables stay frozen
    assert rows.input_rows.grad.abs().sum() > 0
    if kind == "untied":
        assert rows.output_rows.grad.abs().sum() > 0
    with torch.no_grad():
        for param in rows.parameters():
            param.add_(0.5)
        trained = model.forward_seg(images, tokens, compute_lm_loss=True)
    seg = model.seg_token_id
    others = [i for i in range(trained.lm_logits.shape[-1]) if i != seg]
    for row, position in enumerate(tokens.seg_positions.tolist()):
        # before the [SEG] input, only the [SEG] output row differs
        torch.testing.assert_close(trained.lm_logits[row, :position][:, others],
                                   before.lm_logits[row, :position][:, others])
        assert not torch.allclose(trained.lm_logits[row, :position, seg], before.lm_logits[row, :position, seg])
    assert not torch.allclose(trained.seg_hidden, before.seg_hidden)  # [SEG] is an input of the teacher-forced pass

    embed_before = embed.detach().clone()
    state = seg_rows_state(model)
    merge_seg_rows(model)
    assert not hasattr(model, "seg_rows") or model.seg_rows is None
    assert torch.equal(embed[seg], state["seg_rows.input_rows"][0])
    changed = (embed.detach() != embed_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [seg]
    with torch.no_grad():
        merged = model.forward_seg(images, tokens, compute_lm_loss=True)
    torch.testing.assert_close(merged.lm_logits, trained.lm_logits)
    torch.testing.assert_close(merged.mask_logits, trained.mask_logits)

    fresh = _model(kind, untied_dir)
    load_seg_rows_state(fresh, state)
    with torch.no_grad():
        reloaded = fresh.eval().forward_seg(images, tokens, compute_lm_loss=True)
    torch.testing.assert_close(reloaded.lm_logits, trained.lm_logits)
    with pytest.raises(ValueError, match="already has seg_rows"):
        attach_seg_rows(fresh)
    # from trained parameters keyed by name (what a stage writes), without the ids buffer
    params_only = _model(kind, untied_dir)
    load_seg_rows_state(params_only, {k: v for k, v in state.items() if k != "seg_rows.token_ids"})
    with torch.no_grad():
        torch.testing.assert_close(params_only.eval().forward_seg(images, tokens, compute_lm_loss=True).lm_logits,
                                   trained.lm_logits)


def test_generation_reads_the_attached_rows(untied_dir):
    model = _model("untied", untied_dir).eval()
    images, _ = _inputs(model)
    rows = attach_seg_rows(model)
    with torch.no_grad():
        rows.output_rows.mul_(3.0)  # makes [SEG] likely, so the path through it runs
        hooked = model.generate_seg(images, max_new_tokens=4)
    merge_seg_rows(model)
    with torch.no_grad():
        merged = model.generate_seg(images, max_new_tokens=4)
    assert torch.equal(hooked.generated_ids, merged.generated_ids)
    torch.testing.assert_close(hooked.mask_logits, merged.mask_logits)
