"""Stage 1 LoRA: which modules get adapters, the stage through the real loop (one-rank gloo group),
the peft adapter directory and the merged export."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hsft.config import LoraStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.model import Sa2VAModel, load_model
from hsft.stages import lora
from hsft.stages.batching import make_seg_batch
from hsft.stages.report import stage_notes
from hsft.stages.training import Validation

NO_VALIDATION = Validation([], 1, 1)


def test_adapters_only_on_the_language_models_attention_projections(tiny_model, make_tiny_model):
    model = tiny_model
    # The trap the explicit target avoids: other towers have layers of the same names.
    same_names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in lora.ATTENTION_PROJECTIONS]
    assert any(n.startswith("vlm.model.vision_tower.") for n in same_names)
    assert any(n.startswith("sam2.") for n in same_names)

    task = lora.LoraTask(model, [make_fundus(seed=1, size=64)],
                         LoraStageConfig(rank=4, alpha=8.0, mask_loss_weight=1.0), NO_VALIDATION)
    adapted = lora.adapted_modules(model)
    layers = model.vlm.config.text_config.num_hidden_layers
    assert adapted == [f"vlm.model.language_model.layers.{i}.self_attn.{p}"
                       for i in range(layers) for p in lora.ATTENTION_PROJECTIONS]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("text_hidden_fcs.") for n in trainable)
    assert sum(".lora_" in n for n in trainable) == 2 * len(adapted)
    assert any(n.startswith("text_hidden_fcs.") for n in trainable)
    assert task.module.mask_weight == 1.0 and task.module.lm_weight == 1.0

    # CE only (the published recipe, the default): no gradient reaches text_hidden_fcs, so it stays frozen.
    ce_only = make_tiny_model()
    lora.LoraTask(ce_only, [make_fundus(seed=1, size=64)], LoraStageConfig(rank=4), NO_VALIDATION)
    assert not any(p.requires_grad for p in ce_only.text_hidden_fcs.parameters())


def _forward(model: Sa2VAModel, samples):
    batch = make_seg_batch(model, samples, form="response", dtype=torch.float32, device=model.device)
    with torch.no_grad():
        out = model.forward_seg(batch.images, batch.tokens, compute_lm_loss=True)
    return out.mask_logits, out.lm_logits


def test_lora_stage_trains_through_the_loop_and_exports_adapter_and_merged_model(tmp_path, tiny_model_dir,
                                                                                 make_context):
    from peft import PeftModel

    start = tiny_model_dir
    samples = [make_fundus(seed=400 + i, size=64) for i in range(4)]
    cfg = LoraStageConfig(train=TrainConfig(epochs=1, micro_batch=2, grad_accum=1, lr=5e-3, min_lr=5e-3),
                          rank=4, alpha=8.0, dropout=0.0, mask_loss_weight=1.0)
    ctx = make_context(SimpleNamespace(train=samples, val=samples[:1], test=[]), **{"mining.batch_size": 4,
                                                                                    "mining.max_new_tokens": 8})
    result = lora.run(ctx, cfg, start)
    out = result.model_dir
    stage = tmp_path / "run" / "lora"
    assert out == stage / "model"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 and "val_dice" in metrics["epochs"][0]
    assert result.summary["adapted_modules"] == 8
    assert "8 language-model projections" in stage_notes("lora", result.summary)[0]

    # The standard peft adapter directory, for the language model's attention only.
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    assert adapter_config["base_model_name_or_path"] == str((start / "vlm").resolve())
    keys = load_file(str(stage / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all(re.search(r"language_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_[AB]", k) for k in keys)
    non_lora = load_file(str(stage / lora.NON_LORA_FILE))
    assert set(non_lora) == {f"text_hidden_fcs.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}

    # The merged export is a plain model; the adapter loads with peft on the input model's VLM.
    merged = load_model(out)
    assert not lora.adapted_modules(merged)
    adapted = load_model(start)
    PeftModel.from_pretrained(adapted.vlm, str(stage / "adapter"))  # injects into adapted.vlm in place
    assert len(lora.adapted_modules(adapted)) == 8
    adapted.load_state_dict(non_lora, strict=False)
    adapted.eval()

    base_masks, base_lm = _forward(load_model(start), samples[:2])
    merged_masks, merged_lm = _forward(merged, samples[:2])
    adapted_masks, adapted_lm = _forward(adapted, samples[:2])
    # training changed the model (the adapters are not the zero-initialised no-op) ...
    assert (merged_lm - base_lm).abs().max() > 1e-3
    # ... and folding them in changes nothing
    torch.testing.assert_close(merged_lm, adapted_lm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_masks, adapted_masks, rtol=1e-4, atol=1e-4)

    # The merged VLM directory also loads as a plain transformers model.
    from transformers import InternVLForConditionalGeneration

    plain = InternVLForConditionalGeneration.from_pretrained(str(out / "vlm"), local_files_only=True)
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_lora_refuses_a_language_model_without_attention_projections(tiny_model):
    model = tiny_model
    for layer in model.vlm.model.language_model.layers:
        layer.self_attn.q_proj = torch.nn.Identity()
        layer.self_attn.k_proj = torch.nn.Identity()
        layer.self_attn.v_proj = torch.nn.Identity()
        layer.self_attn.o_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match="attention projections"):
        lora.attach_lora(model, LoraStageConfig(rank=4))


def test_the_seg_rows_train_and_go_into_the_merged_model(tmp_path, tiny_model_dir, make_context):
    samples = [make_fundus(seed=420 + i, size=64) for i in range(2)]
    cfg = LoraStageConfig(train=TrainConfig(epochs=1, micro_batch=2, grad_accum=1, lr=5e-2, min_lr=5e-2,
                                            weight_decay=0.0),
                          rank=4, alpha=8.0, dropout=0.0, seg_rows=True)
    ctx = make_context(SimpleNamespace(train=samples, val=[], test=[]))
    result = lora.run(ctx, cfg, tiny_model_dir)
    assert result.summary["seg_rows"]
    before, after = load_model(tiny_model_dir), load_model(result.model_dir)
    seg = before.seg_token_id
    table_before = before.vlm.get_input_embeddings().weight
    table_after = after.vlm.get_input_embeddings().weight
    assert not torch.equal(table_before[seg], table_after[seg])  # the [SEG] row trained
    others = torch.ones(table_before.shape[0], dtype=torch.bool)
    others[seg] = False
    assert torch.equal(table_before[others], table_after[others])  # no other row moved
    saved = load_file(str(tmp_path / "run" / "lora" / lora.NON_LORA_FILE))
    assert torch.equal(saved["seg_rows.input_rows"][0], table_after[seg].float())


def test_the_mask_decoder_trains_with_the_adapters_when_asked_and_goes_into_the_merged_model(
        tmp_path, tiny_model_dir, make_context):
    start = tiny_model_dir
    samples = [make_fundus(seed=410 + i, size=64) for i in range(2)]
    cfg = LoraStageConfig(train=TrainConfig(epochs=1, micro_batch=2, grad_accum=1, lr=5e-3, min_lr=5e-3),
                          rank=4, alpha=8.0, dropout=0.0, mask_loss_weight=1.0, train_mask_decoder=True)
    ctx = make_context(SimpleNamespace(train=samples, val=[], test=[]))
    result = lora.run(ctx, cfg, start)
    assert "mask decoder" in stage_notes("lora", result.summary)[0] and result.summary["train_mask_decoder"] is True
    non_lora = load_file(str(tmp_path / "run" / "lora" / lora.NON_LORA_FILE))
    decoder = {k for k in non_lora if k.startswith("sam2.mask_decoder.")}
    # The decoder trains, except conv_s0/conv_s1 (they belong to the image features, frozen here as in HSFT).
    assert decoder and not any(".conv_s0." in k or ".conv_s1." in k for k in decoder)
    before, after = load_model(start).state_dict(), load_model(result.model_dir).state_dict()
    moved = [k for k in decoder if not torch.equal(before[k], after[k])]
    assert moved, "no decoder weight changed"
    torch.testing.assert_close(after[moved[0]], non_lora[moved[0]])
    assert torch.equal(before["sam2.mask_decoder.conv_s0.weight"], after["sam2.mask_decoder.conv_s0.weight"])


def test_training_the_mask_decoder_needs_the_mask_loss():
    with pytest.raises(ValueError, match="lora.train_mask_decoder: .*--lora-mask-loss-weight"):
        LoraStageConfig(train_mask_decoder=True).validate()


def test_gradient_checkpointing_keeps_the_loss_and_the_gradients(make_tiny_model):
    """The long-sequence memory fix: LoRA with the LLM's activations recomputed in backward takes the step the
    plain backward takes (dropout masks replayed)."""
    samples = [make_fundus(seed=2, size=64), make_fundus(seed=3, size=64)]
    cfg = LoraStageConfig(rank=4, alpha=8.0, dropout=0.1, mask_loss_weight=1.0)
    grads, losses = {}, {}
    for checkpointing in (False, True):
        model = make_tiny_model(seed=0)
        torch.manual_seed(0)  # the adapters' initial values
        task = lora.LoraTask(model, samples, cfg, NO_VALIDATION, checkpointing=checkpointing)
        assert model.vlm.model.language_model.is_gradient_checkpointing == checkpointing
        task.module.train()
        torch.manual_seed(5)  # the LoRA dropout masks
        loss, _ = task.module(task.make_batch([0, 1], torch.float32, torch.device("cpu")))
        loss.backward()
        losses[checkpointing] = loss.detach()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        # The recomputed forward runs the same kernels on the same inputs: equal up to float32 rounding of
        # the summation order, far below the gradients' own size.
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)
