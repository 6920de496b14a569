"""The Sa2VA-style model: presets, tokenisation, preprocessing, the two [SEG] paths, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from hsft.model import (
    EMPTY_MASK_LOGIT,
    PARTS,
    ImageBatch,
    ModelConfig,
    PromptConfig,
    Sa2VAModel,
    SamFeatures,
    build_model,
)
from hsft.model.chat import IGNORE_INDEX
from hsft.model.images import IMAGENET_NORM
from hsft.model.presets import PRESETS
from hsft.model.tokenizer import add_seg_token, build_preset_tokenizer, single_token_id


def circle_image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark disc on a noisy bright background and its mask: something learnable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    radius = rng.uniform(0.15, 0.3) * min(height, width)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    image = rng.normal(180, 20, size=(height, width, 3))
    image[mask] -= 120
    return np.clip(image, 0, 255).astype(np.uint8), mask




@pytest.fixture(scope="module")
def tiny() -> Sa2VAModel:
    return build_model(ModelConfig())


@pytest.fixture(scope="module")
def images(tiny: Sa2VAModel) -> ImageBatch:
    sizes = [(96, 128), (300, 200), (64, 64)]
    return tiny.preprocess([circle_image(h, w, seed)[0] for seed, (h, w) in enumerate(sizes)])


INSTRUCTIONS = ["Please segment the blood vessel.", "Segment the retinal vessels in this fundus photograph.",
                "Where are the vessels?"]


# ---------------------------------------------------------------------------- building
def test_presets_fit_their_parameter_budgets() -> None:
    budgets = {"tiny": (0, 1_000_000), "small": (1_000_000, 10_000_000)}
    for preset, (low, high) in budgets.items():
        model = build_model(ModelConfig(preset=preset))
        counts = model.parameter_counts()
        print(preset, counts)
        assert low <= counts["total"] < high, (preset, counts)
        assert all(counts[part] > 0 for part in PARTS), counts
        assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_trainable_groups_partition_the_parameters(tiny: Sa2VAModel) -> None:
    groups = tiny.trainable_groups()
    assert set(groups) == set(PARTS)
    seen = [id(p) for params in groups.values() for p in params]
    assert len(seen) == len(set(seen)) == len(list(tiny.parameters()))
    # the tied LM head is the input embedding, counted once, under "llm"
    assert tiny.vlm.lm_head.weight is tiny.vlm.get_input_embeddings().weight
    assert any(p is tiny.vlm.lm_head.weight for p in groups["llm"])
    assert any(p is tiny.sam2.prompt_encoder.no_mask_embed.weight for p in groups["mask_decoder"])
    assert any(p is tiny.sam2.mask_decoder.conv_s0.weight for p in groups["sam2_encoder"])


def test_adapters_injected_later_join_their_hosts_part() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = build_model(ModelConfig())
    before = model.parameter_counts()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"),
                            model.vlm)
    after = model.parameter_counts()
    assert after["llm"] > before["llm"] and after["total"] == sum(p.numel() for p in model.parameters())
    assert {k: v for k, v in after.items() if k not in ("llm", "total")} == \
        {k: v for k, v in before.items() if k not in ("llm", "total")}
    model.set_trainable({"mask_decoder"})
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first, second = build_model(ModelConfig(), seed=3), build_model(ModelConfig(), seed=3)
    assert torch.equal(state, torch.get_rng_state())
    other = build_model(ModelConfig(), seed=4)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text_hidden_fcs.0.weight"], c["text_hidden_fcs.0.weight"])
    assert first.tokenizer.get_vocab() == other.tokenizer.get_vocab()


def test_model_shapes_follow_the_configs(tiny: Sa2VAModel) -> None:
    assert tiny.hidden_size == 64 and tiny.prompt_width == 64 and tiny.fcs_hidden == 16
    spec = PRESETS["tiny"]
    side = spec.sam2.image_size // 4  # SAM2's low-res masks are a quarter of its input side
    assert (tiny.vlm_image_size, tiny.sam_image_size, tiny.mask_size) == (64, spec.sam2.image_size, (side, side))
    assert tiny.text_hidden_fcs[0].in_features == 64 and tiny.text_hidden_fcs[2].out_features == 64
    wide = build_model(ModelConfig(fcs_hidden=40))
    assert wide.text_hidden_fcs[0].out_features == 40 and wide.text_hidden_fcs[2].in_features == 40
    assert len(tiny.tokenizer) < 1000 and tiny.tokenizer.padding_side == "left"


def test_seg_must_be_a_single_token(tiny: Sa2VAModel) -> None:
    assert single_token_id(tiny.tokenizer, "[SEG]") == tiny.seg_token_id
    plain = build_preset_tokenizer(300, include_seg=False)
    with pytest.raises(ValueError, match=r"'\[SEG\]' must encode to exactly one token id"):
        single_token_id(plain, "[SEG]")
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        Sa2VAModel(tiny.vlm, tiny.sam2, plain, PromptConfig())
    seg_id = add_seg_token(plain)
    assert plain.encode("Sure, [SEG].", add_special_tokens=False).count(seg_id) == 1


def test_config_validation_names_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"prompt.response: must contain exactly one \[SEG\], found 0"):
        PromptConfig(response="Sure.").validate()
    with pytest.raises(ValueError, match=r"prompt.response: must contain exactly one \[SEG\], found 2"):
        PromptConfig(response="[SEG] and [SEG]").validate()
    with pytest.raises(ValueError, match="prompt.instruction"):
        PromptConfig(instruction="segment [SEG]").validate()
    with pytest.raises(ValueError, match=r"model.preset: unknown preset 'huge'; valid presets are tiny, small"):
        ModelConfig(preset="huge").validate()
    with pytest.raises(ValueError, match="model.sam2: give both"):
        ModelConfig(vlm=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="model.vlm: checkpoint directory .*missing.* does not exist"):
        ModelConfig(vlm=str(tmp_path / "missing"), sam2=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="model.vlm: .* has no config.json"):
        ModelConfig(vlm=str(tmp_path), sam2=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="model.dtype"):
        ModelConfig(dtype="int8").validate()
    with pytest.raises(ValueError, match="model.prompt.response"):
        build_model(ModelConfig(prompt=PromptConfig(response="no seg")))


# ---------------------------------------------------------------------------- tokens and images
def test_tokenize_response_form(tiny: Sa2VAModel) -> None:
    tokens = tiny.tokenize(3, instruction=INSTRUCTIONS)
    lengths = tokens.attention_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1, "different instructions should need padding"
    for row in range(3):
        pad = tokens.input_ids.shape[1] - int(lengths[row])
        assert tokens.attention_mask[row, :pad].sum() == 0 and bool(tokens.attention_mask[row, pad:].all())
        assert bool((tokens.input_ids[row, :pad] == tiny.pad_token_id).all())
        labelled = tokens.labels[row][tokens.labels[row] != IGNORE_INDEX]
        assert tiny.tokenizer.decode(labelled) == "Sure, [SEG].<|im_end|>"
        # labels are the inputs at the same positions (the loss shifts them)
        keep = tokens.labels[row] != IGNORE_INDEX
        assert torch.equal(tokens.input_ids[row][keep], labelled)
        assert tokens.input_ids[row, tokens.seg_positions[row]] == tiny.seg_token_id
        text = tiny.tokenizer.decode(tokens.input_ids[row, pad:])
        assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 16 + "</img>\n" + INSTRUCTIONS[row])
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\nSure, [SEG].<|im_end|>")


def test_tokenize_prompt_and_generate_forms(tiny: Sa2VAModel) -> None:
    prompt = tiny.tokenize(2, form="prompt")
    assert bool((prompt.labels == IGNORE_INDEX).all())
    text = tiny.tokenizer.decode(prompt.input_ids[0])
    assert text.endswith("Please segment the blood vessel.[SEG]<|im_end|>\n") and "assistant" not in text
    assert prompt.input_ids[0, prompt.seg_positions[0]] == tiny.seg_token_id
    generate = tiny.tokenize(2, form="generate")
    assert tiny.tokenizer.decode(generate.input_ids[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert bool((generate.seg_positions == -1).all()) and bool((generate.labels == IGNORE_INDEX).all())
    with pytest.raises(ValueError, match="form"):
        tiny.tokenize(2, form="chat")
    with pytest.raises(ValueError, match=r"response\[1\]: must contain exactly one \[SEG\]"):
        tiny.tokenize(2, response=["Sure, [SEG].", "Sure, [SEG] [SEG]."])
    with pytest.raises(ValueError, match="instruction: must be a string or a list of 2"):
        tiny.tokenize(2, instruction=["only one"])


def test_preprocess_resizes_and_normalises(tiny: Sa2VAModel) -> None:
    grey = np.full((37, 53, 3), 100, dtype=np.uint8)
    batch = tiny.preprocess([grey, circle_image(300, 90, 0)[0]])
    side = tiny.sam_image_size
    assert batch.vlm_pixels.shape == (2, 3, 64, 64) and batch.sam_pixels.shape == (2, 3, side, side)
    assert batch.original_sizes == [(37, 53), (300, 90)]
    expected = (100 / 255 - torch.tensor(IMAGENET_NORM.mean)) / torch.tensor(IMAGENET_NORM.std)
    assert torch.allclose(batch.sam_pixels[0].mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(batch.vlm_pixels[0].amax(dim=(1, 2)), batch.vlm_pixels[0].amin(dim=(1, 2)), atol=1e-5)
    half = batch.to(dtype=torch.bfloat16)
    assert half.vlm_pixels.dtype == torch.bfloat16 and half.original_sizes == batch.original_sizes
    with pytest.raises(ValueError, match=r"images\[1\]: expected dtype uint8"):
        tiny.preprocess([grey, grey.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\]: expected an \(H, W, 3\) RGB array"):
        tiny.preprocess([grey[..., 0]])


# ---------------------------------------------------------------------------- forward path
def test_forward_seg_shapes_loss_and_gradients(tiny: Sa2VAModel, images: ImageBatch) -> None:
    tokens = tiny.tokenize(3, instruction=INSTRUCTIONS)
    out = tiny.forward_seg(images, tokens, compute_lm_loss=True)
    assert out.mask_logits.shape == (3, *tiny.mask_size) and out.mask_logits.dtype == torch.float32
    assert out.seg_hidden.shape == (3, 64) and out.seg_embedding.shape == (3, 64)
    assert out.lm_logits.shape == (3, tokens.input_ids.shape[1], len(tiny.tokenizer))
    assert out.lm_loss.ndim == 0 and bool(torch.isfinite(out.lm_loss))
    # an untrained model is close to uniform over the vocabulary
    assert abs(float(out.lm_loss.detach()) - np.log(len(tiny.tokenizer))) < 1.5
    tiny.zero_grad()
    (out.mask_logits.float().mean() + out.lm_loss).backward()
    groups = tiny.trainable_groups()
    for part in ("text_hidden_fcs", "mask_decoder", "llm", "vision", "sam2_encoder"):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in groups[part]), part
    tiny.zero_grad()
    assert tiny.forward_seg(images, tokens).lm_loss is None


def test_forward_seg_requires_exactly_one_seg(tiny: Sa2VAModel, images: ImageBatch) -> None:
    with pytest.raises(ValueError, match=r"exactly one \[SEG\].*\{0: 0, 1: 0, 2: 0\}"):
        tiny.forward_seg(images, tiny.tokenize(3, form="generate"))
    tokens = tiny.tokenize(3)
    tokens.input_ids[1, tokens.seg_positions[1] - 1] = tiny.seg_token_id
    with pytest.raises(ValueError, match=r"\{1: 2\}"):
        tiny.forward_seg(images, tokens)
    with pytest.raises(ValueError, match="2 images but 3 token sequences"):
        tiny.forward_seg(images.select([0, 1]), tiny.tokenize(3))
    with pytest.raises(ValueError, match="no labelled tokens"):
        tiny.forward_seg(images, tiny.tokenize(3, form="prompt"), compute_lm_loss=True)


def test_forward_seg_equals_cached_decode(tiny: Sa2VAModel, images: ImageBatch) -> None:
    tokens = tiny.tokenize(3, instruction=INSTRUCTIONS)
    with torch.no_grad():
        out = tiny.forward_seg(images, tokens)
        feats = tiny.sam_features(images.sam_pixels)
        seg_hidden = tiny.seg_hidden_states(images, tokens)
        assert torch.equal(seg_hidden, out.seg_hidden)
        assert torch.equal(tiny.decode_masks(feats, seg_hidden), out.mask_logits)
        # a cache built sample by sample and re-assembled decodes the same
        cached = SamFeatures.cat([tiny.sam_features(images.select([i]).sam_pixels).detach() for i in range(3)])
        assert torch.allclose(tiny.decode_masks(cached, seg_hidden), out.mask_logits, atol=1e-5)
        single = tiny.decode_masks(feats.index(1), seg_hidden[1:2])
        assert torch.allclose(single[0], out.mask_logits[1], atol=1e-5)
    h, w = tiny.mask_size  # SAM2 levels: the mask size, half of it, a quarter of it
    assert feats.image_embedding.shape == (3, 64, h // 4, w // 4)
    assert feats.feat_s0.shape == (3, 8, h, w) and feats.feat_s1.shape == (3, 16, h // 2, w // 2)


def test_cached_training_matches_uncached_gradients(tiny: Sa2VAModel, images: ImageBatch) -> None:
    """With the encoders frozen, a loss on cached features gives the uncached gradients."""
    tokens = tiny.tokenize(3, instruction=INSTRUCTIONS)
    tiny.set_trainable({"text_hidden_fcs", "mask_decoder"})
    try:
        trainable = [p for p in tiny.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for part in ("text_hidden_fcs", "mask_decoder")
                                              for p in tiny.trainable_groups()[part]}
        tiny.forward_seg(images, tokens).mask_logits.sigmoid().mean().backward()
        uncached = [p.grad.clone() if p.grad is not None else None for p in trainable]
        tiny.zero_grad()
        with torch.no_grad():
            feats, seg_hidden = tiny.sam_features(images), tiny.seg_hidden_states(images, tokens)
        tiny.decode_masks(feats, seg_hidden).sigmoid().mean().backward()
        for param, expected in zip(trainable, uncached):
            assert (param.grad is None) == (expected is None)
            if expected is not None:
                assert torch.allclose(param.grad, expected, atol=1e-7)
        assert all(p.grad is None for p in tiny.trainable_groups()["llm"])
        with pytest.raises(ValueError, match="unknown \\['decoder'\\]"):
            tiny.set_trainable({"decoder"})
    finally:
        tiny.zero_grad()
        tiny.set_trainable(PARTS)


# ---------------------------------------------------------------------------- generate path
class ForceTokens(LogitsProcessor):
    """Forces row b to emit rows[b] (then anything), or, for None rows, forbids `forbid`."""

    def __init__(self, rows: list[list[int] | None], forbid: int | None = None) -> None:
        self.rows, self.forbid, self.start = rows, forbid, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]  # the first call sees the prompt only
        step = input_ids.shape[1] - self.start
        scores = scores.clone()
        for row, forced in enumerate(self.rows):
            if forced is not None and step < len(forced):
                scores[row] = -float("inf")
                scores[row, forced[step]] = 0.0
            elif forced is None and self.forbid is not None:
                scores[row, self.forbid] = -float("inf")
        return scores


def _answer_ids(model: Sa2VAModel, text: str, *, end: bool = True) -> list[int]:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return ids + [model.eos_token_id] if end else ids


def test_both_seg_paths_agree_when_generation_emits_the_response(tiny: Sa2VAModel, images: ImageBatch) -> None:
    answer = _answer_ids(tiny, tiny.prompt.response)
    gen = tiny.generate_seg(images, instruction=INSTRUCTIONS, max_new_tokens=12,
                            logits_processor=[ForceTokens([answer] * 3)])
    forward = tiny.forward_seg(images, tiny.tokenize(3, instruction=INSTRUCTIONS))
    assert gen.text == ["Sure, [SEG]."] * 3
    assert gen.seg_emitted.tolist() == [True] * 3 and gen.num_seg.tolist() == [1] * 3
    assert gen.generated_ids.shape[1] == len(answer), "generation stops at the end token"
    assert torch.allclose(gen.seg_hidden, forward.seg_hidden, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gen.seg_embedding, forward.seg_embedding, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gen.mask_logits, forward.mask_logits.detach(), atol=1e-4, rtol=1e-4)
    # the rows really differ (different images and prompts), so the agreement is per row
    assert not torch.allclose(gen.seg_hidden[0], gen.seg_hidden[1], atol=1e-3)


def test_seg_as_the_last_generated_token(tiny: Sa2VAModel, images: ImageBatch) -> None:
    upto_seg = _answer_ids(tiny, "Sure, [SEG]", end=False)
    assert upto_seg[-1] == tiny.seg_token_id
    gen = tiny.generate_seg(images, instruction=INSTRUCTIONS, max_new_tokens=len(upto_seg),
                            logits_processor=[ForceTokens([upto_seg] * 3)])
    assert gen.seg_index.tolist() == [len(upto_seg) - 1] * 3 == [gen.generated_ids.shape[1] - 1] * 3
    forward = tiny.forward_seg(images, tiny.tokenize(3, instruction=INSTRUCTIONS))
    assert bool(gen.seg_hidden.abs().sum(dim=1).gt(0).all())
    assert torch.allclose(gen.seg_hidden, forward.seg_hidden, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gen.mask_logits, forward.mask_logits.detach(), atol=1e-4, rtol=1e-4)


def test_generation_without_seg_gives_an_empty_mask(tiny: Sa2VAModel, images: ImageBatch) -> None:
    twice = _answer_ids(tiny, "Sure, [SEG] [SEG].")
    gen = tiny.generate_seg(images, instruction=INSTRUCTIONS, max_new_tokens=10,
                            logits_processor=[ForceTokens([twice, None, None], forbid=tiny.seg_token_id)])
    assert gen.seg_emitted.tolist() == [True, False, False]
    assert gen.num_seg.tolist() == [2, 0, 0] and gen.seg_index.tolist()[1:] == [-1, -1]
    assert gen.text[0] == "Sure, [SEG] [SEG]." and "[SEG]" not in gen.text[1]
    assert bool((gen.mask_logits[1:] == EMPTY_MASK_LOGIT).all()) and int((gen.mask_logits[1:] > 0).sum()) == 0
    assert bool((gen.seg_hidden[1:] == 0).all()) and bool((gen.seg_embedding[1:] == 0).all())
    # the first of two [SEG]s is the one used: same state as the teacher-forced single [SEG]
    forward = tiny.forward_seg(images.select([0]), tiny.tokenize(1, instruction=INSTRUCTIONS[0]))
    assert torch.allclose(gen.seg_hidden[0], forward.seg_hidden[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate_seg(images, max_new_tokens=0)


def test_bfloat16_runs_both_paths(images: ImageBatch) -> None:
    model = build_model(ModelConfig(dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and model.vlm.dtype == torch.bfloat16
    tokens = model.tokenize(3, instruction=INSTRUCTIONS)
    out = model.forward_seg(images.to(dtype=torch.bfloat16), tokens, compute_lm_loss=True)
    assert out.mask_logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.lm_loss))
    (out.mask_logits.float().mean() + out.lm_loss).backward()
    assert model.text_hidden_fcs[0].weight.grad.dtype == torch.bfloat16
    answer = _answer_ids(model, model.prompt.response)
    gen = model.generate_seg(images, instruction=INSTRUCTIONS, logits_processor=[ForceTokens([answer] * 3)])
    assert gen.mask_logits.dtype == torch.bfloat16 and gen.seg_emitted.all()
    assert torch.allclose(gen.seg_hidden.float(), out.seg_hidden.detach().float(), atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------- training
def test_a_few_adamw_steps_reduce_the_loss() -> None:
    model = build_model(ModelConfig(), seed=0).train()
    pairs = [circle_image(160, 200, seed) for seed in range(4)]
    images = model.preprocess([image for image, _ in pairs])
    targets = torch.stack([torch.from_numpy(mask).float() for _, mask in pairs])[:, None]
    targets = F.interpolate(targets, size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
    tokens = model.tokenize(len(pairs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def losses_of(out) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.interpolate(out.mask_logits[:, None].float(), size=(128, 128), mode="bilinear",
                               align_corners=False)[:, 0]
        return F.binary_cross_entropy_with_logits(logits, targets), out.lm_loss

    history = []
    for step in range(11):
        mask_loss, lm_loss = losses_of(model.forward_seg(images, tokens, compute_lm_loss=True))
        history.append((float(mask_loss.detach()), float(lm_loss.detach())))
        if step == 10:
            break
        optimizer.zero_grad()
        (mask_loss + lm_loss).backward()
        optimizer.step()
    print("mask, lm losses", [(round(m, 3), round(lm, 3)) for m, lm in history])
    assert np.isfinite(history).all()
    (first_mask, first_lm), (last_mask, last_lm) = history[0], history[-1]
    assert last_mask < 0.8 * first_mask and last_lm < 0.8 * first_lm, history
