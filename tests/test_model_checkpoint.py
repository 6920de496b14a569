"""Saving / loading the composite, and building from real-format local checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import Sam2Model

from hsft.model import ModelConfig, PromptConfig, Sa2VAModel, build_model, load_model, save_model
from hsft.model.checkpoint import META_FILE, is_model_directory
from hsft.model.presets import PRESETS, sam2_config

from plain_checkpoints import save_plain_checkpoints


def _images(model: Sa2VAModel):
    rng = np.random.default_rng(7)
    return model.preprocess([rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(90, 70), (64, 64)]])


def _perturbed(model: Sa2VAModel, seed: int) -> Sa2VAModel:
    """Move every weight off its initial value, so a loader that re-initialised anything is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    return model


def _assert_same_state(a: Sa2VAModel, b: Sa2VAModel) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_exact(tmp_path, dtype: str) -> None:
    prompt = PromptConfig(instruction="Segment the vessels.", response="It is [SEG].", system="Be brief.")
    model = _perturbed(build_model(ModelConfig(prompt=prompt, fcs_hidden=20, dtype=dtype)), seed=1)
    assert not is_model_directory(tmp_path / "m")
    save_model(model, tmp_path / "m")
    assert is_model_directory(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.dtype == getattr(torch, dtype) and not loaded.training
    assert loaded.prompt == prompt and loaded.fcs_hidden == 20
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.seg_token_id == model.seg_token_id and loaded.tokenizer.padding_side == "left"
    _assert_same_state(model, loaded)
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name  # non-persistent ones too (rotary frequencies)

    images = _images(model).to(dtype=model.dtype)
    tokens = model.tokenize(2)
    with torch.no_grad():
        before, after = model.forward_seg(images, tokens, compute_lm_loss=True), loaded.forward_seg(
            images, tokens, compute_lm_loss=True)
    assert torch.equal(before.mask_logits, after.mask_logits)
    assert torch.equal(before.seg_embedding, after.seg_embedding) and torch.equal(before.lm_loss, after.lm_loss)
    first, second = model.generate_seg(images, max_new_tokens=6), loaded.generate_seg(images, max_new_tokens=6)
    assert first.text == second.text and torch.equal(first.mask_logits, second.mask_logits)


def test_load_in_another_dtype(tmp_path) -> None:
    model = build_model(ModelConfig())
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.sam2.dtype == torch.bfloat16
    assert torch.equal(loaded.text_hidden_fcs[0].weight, model.text_hidden_fcs[0].weight.bfloat16())


def test_build_from_local_checkpoints(tmp_path) -> None:
    vlm_dir, sam_dir, vlm, sam2 = save_plain_checkpoints(tmp_path)
    old_rows = vlm.get_input_embeddings().num_embeddings
    model = build_model(ModelConfig(vlm=vlm_dir, sam2=sam_dir, fcs_hidden=24), seed=5)

    assert model.seg_token_id == old_rows, "[SEG] is appended to the vocabulary"
    embeddings = model.vlm.get_input_embeddings().weight
    assert embeddings.shape[0] == old_rows + 1 and model.vlm.lm_head.weight is embeddings
    assert torch.equal(embeddings[:old_rows], vlm.get_input_embeddings().weight)
    assert all(torch.equal(a, b) for a, b in zip(model.sam2.state_dict().values(), sam2.state_dict().values()))
    assert not model.sam2.mask_decoder.dynamic_multimask_via_stability
    assert model.text_hidden_fcs[0].out_features == 24 and model.text_hidden_fcs[2].out_features == 64
    assert model.sam_norm.mean == (0.5, 0.5, 0.5) and model.vlm_norm.std == (0.229, 0.224, 0.225)

    images = _images(model)
    out = model.forward_seg(images, model.tokenize(2), compute_lm_loss=True)
    assert out.mask_logits.shape == (2, *model.mask_size) and bool(torch.isfinite(out.lm_loss))
    gen = model.generate_seg(images, max_new_tokens=4)
    assert len(gen.text) == 2 and gen.mask_logits.shape == (2, *model.mask_size)

    # the composite's vlm/ and sam2/ are ordinary checkpoints again ([SEG] already present: no resize)
    save_model(model, tmp_path / "composite")
    again = build_model(ModelConfig(vlm=str(tmp_path / "composite" / "vlm"), sam2=str(tmp_path / "composite" / "sam2")))
    assert again.seg_token_id == model.seg_token_id
    assert torch.equal(again.vlm.get_input_embeddings().weight, embeddings)


def test_bad_directories_give_clear_errors(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"model directory '{missing}' does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}' is not a complete hsft model directory: "
                                                f"{META_FILE} is missing"):
        load_model(tmp_path)

    saved = tmp_path / "saved"
    save_model(build_model(ModelConfig()), saved)
    meta_path = saved / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_model(saved)
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(saved / "sam2")
    with pytest.raises(FileNotFoundError, match="sam2 is missing"):
        load_model(saved)

    # a SAM2 checkpoint given as the VLM, and a checkpoint directory without weights
    vlm_dir = saved / "vlm"
    sam_only = tmp_path / "sam_only"
    Sam2Model(sam2_config(PRESETS["tiny"].sam2)).save_pretrained(sam_only)
    with pytest.raises(ValueError, match="model.vlm: .* holds a 'sam2' checkpoint, expected 'internvl'"):
        build_model(ModelConfig(vlm=str(sam_only), sam2=str(sam_only)))
    (vlm_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.vlm: .* has no weights"):
        build_model(ModelConfig(vlm=str(vlm_dir), sam2=str(sam_only)))
