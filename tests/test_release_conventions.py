"""The release's inference conventions on an imported model (template, <image> placement, BOS, image
resize, training path), and --prompt in launch/predict.py and launch/evaluate.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsft.eval import InputError
from hsft.eval.cli import load_checkpoint, run_predict
from hsft.model.checkpoint import load_model
from hsft.model.images import IMAGENET_NORM, ImagePreprocessor
from hsft.model.release import import_sa2va
from hsft.model.tokenizer import IM_START, IMG_END

from launch_scripts import launch_main
from release_checkpoints import write_release, write_sam2_config


@pytest.fixture(scope="module")
def imported_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    sam2 = write_sam2_config(root / "sam2.json")
    dirs = {}
    for family in ("qwen2", "internlm2"):
        src, _ = write_release(root / f"src-{family}", family=family, dtype=torch.float32)
        import_sa2va(src, root / family, sam2_config_file=sam2)
        dirs[family] = root / family
    return dirs


def test_template_places_the_image_where_the_text_says(imported_dirs):
    model = load_model(str(imported_dirs["qwen2"]))
    tokenizer = model.tokenizer
    plain = tokenizer.decode(model.tokenize(1, form="generate", instruction="Segment the vessel.").input_ids[0])
    leading_ids = model.tokenize(1, form="generate", instruction="<image>Segment the vessel.").input_ids[0]
    leading = tokenizer.decode(leading_ids)
    assert plain.startswith(f"{IM_START}user\n<img>") and plain.endswith(
        f"{IMG_END}\nSegment the vessel.<|im_end|>\n{IM_START}assistant\n")
    # the release's own code replaces <image> by the image tokens, with nothing in between
    assert leading.endswith(f"{IMG_END}Segment the vessel.<|im_end|>\n{IM_START}assistant\n")
    for bad in ("Segment <image> the vessel.", "<image>", "<image><image>x"):
        with pytest.raises(ValueError, match="instruction"):
            model.tokenize(1, form="generate", instruction=bad)


def _first_tokens(model) -> list[int]:
    tokens = model.tokenize(2, form="response", instruction=["a", "a longer instruction"])
    first = tokens.attention_mask.argmax(dim=1)  # left padding: the first real token
    return tokens.input_ids.gather(1, first[:, None])[:, 0].tolist()


def test_internlm2_conversations_start_with_bos(imported_dirs):
    model = load_model(str(imported_dirs["internlm2"]))
    assert model.conventions.bos_token
    assert _first_tokens(model) == [model.tokenizer.bos_token_id] * 2
    qwen = load_model(str(imported_dirs["qwen2"]))
    assert _first_tokens(qwen) == [qwen.tokenizer.convert_tokens_to_ids(IM_START)] * 2


def test_pil_bicubic_resize_is_the_release_preprocessing():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    batch = ImagePreprocessor(16, 24, resize="pil_bicubic")([image])
    for size, pixels in ((16, batch.vlm_pixels), (24, batch.sam_pixels)):
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        want = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(IMAGENET_NORM.mean)[:, None, None]) \
            / torch.tensor(IMAGENET_NORM.std)[:, None, None]
        torch.testing.assert_close(pixels[0], want)
    assert batch.original_sizes == [(37, 53)]
    with pytest.raises(ValueError, match="resize"):
        ImagePreprocessor(16, 24, resize="nearest")


def test_imported_model_trains_and_generates_with_its_conventions(imported_dirs):
    """The teacher-forced path (training) and generation use the same decoder conventions: gradients
    reach text_hidden_fcs and the mask decoder, and a generated [SEG] decodes like the forward one."""
    model = load_model(str(imported_dirs["qwen2"]))
    rng = np.random.default_rng(1)
    images = model.preprocess([rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(2)])
    model.train()
    out = model.forward_seg(images, model.tokenize(2, form="response"), compute_lm_loss=True)
    gated = out.mask_logits == -1024.0
    (out.mask_logits.float().sum() + out.lm_loss).backward()
    assert model.text_hidden_fcs[0].weight.grad is not None
    assert model.vlm.model.language_model.embed_tokens.weight.grad is not None
    if not bool(gated.all()):
        assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        forward = model.forward_seg(images, model.tokenize(2, form="response"))
    torch.testing.assert_close(model.decode_masks(model.sam_features(images), forward.seg_hidden), forward.mask_logits)


def test_prompt_option_is_validated_before_loading_and_used(imported_dirs, tmp_path):
    with pytest.raises(InputError, match=r"--prompt: must not contain \[SEG\]"):
        run_predict(imported_dirs["qwen2"], [tmp_path / "x.png"], tmp_path / "out", prompt="find [SEG]")
    with pytest.raises(InputError, match="<image> may only lead the text"):
        load_checkpoint(imported_dirs["qwen2"], prompt="Segment <image> it")
    model = load_checkpoint(imported_dirs["qwen2"], prompt="<image>Please segment the optic disc.")
    assert model.prompt.instruction == "<image>Please segment the optic disc."
    text = model.tokenizer.decode(model.tokenize(1, form="generate").input_ids[0])
    assert f"{IMG_END}Please segment the optic disc." in text


def test_predict_and_evaluate_take_prompt(tmp_path, capsys, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(image)
    predict = launch_main("predict")
    assert predict(["--checkpoint", str(tmp_path / "model"), str(image), "--out", str(tmp_path / "p"),
                    "--device", "cpu", "--prompt", "<image>Please segment the blood vessels."]) == 0
    assert (tmp_path / "p" / "a_mask.png").is_file()
    capsys.readouterr()
    evaluate = launch_main("evaluate")
    assert evaluate(["--checkpoint", str(tmp_path / "model"), "--output", str(tmp_path / "e"), "--limit", "1",
                     "--device", "cpu", "--no-tensorboard", "--prompt", "Segment <image> now"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt" in err[0] and "<image> may only lead" in err[0]
