"""Released Sa2VA checkpoints: import -> hsft model directory -> export, on tiny checkpoints written
with the release's exact tensor names and config fields (tests/release_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hsft.model.checkpoint import load_model, save_model
from hsft.model.config import Conventions
from hsft.model.features import SamFeatures
from hsft.model.release import ReleaseError, export_sa2va, import_sa2va
from hsft.model.release.keys import (
    merge_internlm2_wqkv,
    merge_vision_qkv,
    split_internlm2_wqkv,
    split_vision_qkv,
)

from release_checkpoints import ROPE_THETA, SIZES, write_release, write_sam2_config
import release_reference as ref

VIDEO_ONLY = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
              "obj_ptr_proj.", "mask_downsample.")


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _files(directory: Path) -> dict[str, str]:
    with open(directory / "model.safetensors.index.json", encoding="utf-8") as handle:
        return json.load(handle)["weight_map"]


@pytest.fixture(scope="module")
def sam2_config_file(tmp_path_factory) -> str:
    return write_sam2_config(tmp_path_factory.mktemp("cfg") / "tiny_sam2.json")


CASES = [  # family, dtype, shards, tied lm_head
    ("qwen2", torch.bfloat16, 1, True),
    ("qwen2", torch.float32, 3, False),
    ("internlm2", torch.bfloat16, 2, False),
]


@pytest.mark.parametrize("family,dtype,shards,tie", CASES, ids=["qwen2-bf16-tied", "qwen2-fp32-sharded",
                                                                 "internlm2-bf16-sharded"])
def test_import_export_round_trip_is_bit_exact(tmp_path, sam2_config_file, family, dtype, shards, tie):
    src, tensors = write_release(tmp_path / "src", family=family, dtype=dtype, shards=shards, tie=tie)
    report = import_sa2va(src, tmp_path / "model", sam2_config_file=sam2_config_file)

    # coverage: every tensor is either mapped into the model or kept beside it, and the kept ones are
    # exactly SAM2's video-memory tensors
    kept = {key for key in tensors if key.removeprefix(ref.S).startswith(VIDEO_ONLY)}
    assert set(report.kept) == kept and report.unrecognised == []
    assert report.mapped + len(report.kept) == len(tensors) == report.tensors
    assert report.llm_family == family and report.tied_lm_head == (family == "qwen2" and tie)
    assert report.dtype == str(dtype).removeprefix("torch.")
    assert (tmp_path / "model" / "conversion_report.md").is_file()

    model = load_model(str(tmp_path / "model"))
    assert model.conventions == Conventions.release(bos_token=family == "internlm2")
    # SAM2 reads its input normalised as the release's preprocess_image does it (bfloat16 constants)
    assert (model.sam_norm.mean, model.sam_norm.std) == (ref.SAM2_MEAN, ref.SAM2_STD) != \
        (ref.IMAGENET_MEAN, ref.IMAGENET_STD)
    assert model.vlm_norm.mean == ref.IMAGENET_MEAN
    assert report.sam_norm == {"mean": list(ref.SAM2_MEAN), "std": list(ref.SAM2_STD)}
    assert isinstance(model.text_hidden_fcs[1], torch.nn.ReLU)
    assert model.fcs_hidden == SIZES.fcs_hidden

    out = export_sa2va(tmp_path / "model", tmp_path / "export")
    exported = _read_all(out)
    assert set(exported) == set(tensors)
    for key, value in tensors.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key
    if shards > 1:
        assert _files(out) == _files(src)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "modeling_sa2va_chat.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_fine_tuned_weights_reach_the_export(tmp_path, sam2_config_file):
    """A model saved again (as every stage does) keeps release/, and its changed tensors are exported."""
    src, tensors = write_release(tmp_path / "src", family="internlm2", dtype=torch.float32, shards=2)
    import_sa2va(src, tmp_path / "model", sam2_config_file=sam2_config_file)
    model = load_model(str(tmp_path / "model"))
    with torch.no_grad():
        model.vlm.model.language_model.layers[1].self_attn.k_proj.weight.add_(1.0)
        model.sam2.mask_decoder.iou_token.weight.mul_(2.0)
        model.text_hidden_fcs[2].bias.sub_(0.5)
    save_model(model, tmp_path / "stage")
    exported = _read_all(export_sa2va(tmp_path / "stage", tmp_path / "export"))
    changed = {key for key in tensors if not torch.equal(exported[key], tensors[key])}
    assert changed == {"language_model.model.layers.1.attention.wqkv.weight",
                       f"{ref.S}sam_mask_decoder.iou_token.weight", "text_hidden_fcs.2.bias"}
    heads, kv, d = SIZES.heads, SIZES.kv_heads, SIZES.llm // SIZES.heads
    grouped = (exported["language_model.model.layers.1.attention.wqkv.weight"]
               - tensors["language_model.model.layers.1.attention.wqkv.weight"]).view(kv, heads // kv + 2, d, -1)
    torch.testing.assert_close(grouped[:, -2], torch.ones_like(grouped[:, -2]))  # the key rows moved
    assert torch.all(grouped[:, :-2] == 0) and torch.all(grouped[:, -1] == 0)


def test_qkv_splits_match_a_direct_computation():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    qkv = torch.randn(3 * 12, 12, generator=generator, dtype=torch.float64)
    q, k, v = split_vision_qkv(qkv, 12)
    fused = x @ qkv.T  # InternViT: reshape(B, N, 3, heads, d), the 3 outermost
    assert torch.equal(x @ q.T, fused[:, :12]) and torch.equal(x @ v.T, fused[:, 24:])
    assert torch.equal(merge_vision_qkv(q, k, v), qkv)

    heads, kv, d, hidden = 6, 2, 4, 16
    wqkv = torch.randn((heads + 2 * kv) * d, hidden, generator=generator, dtype=torch.float64)
    q, k, v = split_internlm2_wqkv(wqkv, heads, kv, d)
    x = torch.randn(3, hidden, generator=generator, dtype=torch.float64)
    grouped = (x @ wqkv.T).view(3, kv, heads // kv + 2, d)  # as InternLM2's attention forward reads it
    assert torch.equal((x @ q.T).view(3, heads, d), grouped[:, :, : heads // kv].reshape(3, heads, d))
    assert torch.equal((x @ k.T).view(3, kv, d), grouped[:, :, -2])
    assert torch.equal((x @ v.T).view(3, kv, d), grouped[:, :, -1])
    assert torch.equal(merge_internlm2_wqkv(q, k, v, heads, kv, d), wqkv)
    with pytest.raises(ValueError, match="expected 40 rows"):
        split_internlm2_wqkv(wqkv[:-1], heads, kv, d)


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def imported(request, tmp_path_factory, sam2_config_file):
    root = tmp_path_factory.mktemp(request.param)
    src, tensors = write_release(root / "src", family=request.param, dtype=torch.float32, shards=1, tie=False)
    import_sa2va(src, root / "model", sam2_config_file=sam2_config_file)
    return request.param, load_model(str(root / "model")), tensors


def test_vision_block_and_projector_match_the_release(imported):
    _, model, t = imported
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 65, SIZES.vision, generator=generator)
    layer = model.vlm.model.vision_tower.encoder.layer[1]
    with torch.no_grad():
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, ref.vision_block(x, t, 1, SIZES.vision_heads), rtol=1e-5, atol=1e-5)
        shuffled = torch.randn(2, 16, 4 * SIZES.vision, generator=generator)
        torch.testing.assert_close(model.vlm.model.multi_modal_projector(shuffled), ref.projector(shuffled, t),
                                   rtol=1e-5, atol=1e-5)


def test_llm_matches_the_release(imported):
    family, model, t = imported
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        hidden = model.vlm.model.language_model(input_ids=ids).last_hidden_state
        logits = model.vlm.lm_head(hidden)
    want = ref.llm_hidden(ids, t, family, layers=SIZES.llm_layers, heads=SIZES.heads, kv_heads=SIZES.kv_heads,
                          theta=ROPE_THETA)
    torch.testing.assert_close(hidden, want, rtol=1e-4, atol=1e-5)
    head = t["language_model.lm_head.weight" if family == "qwen2" else "language_model.output.weight"]
    torch.testing.assert_close(logits, want @ head.T, rtol=1e-4, atol=1e-4)


def test_seg_projection_and_mask_decoder_match_the_release(imported):
    _, model, t = imported
    generator = torch.Generator().manual_seed(3)
    batch, width, side = 8, SIZES.sam_width, SIZES.sam_image // 16
    feats = SamFeatures(torch.randn(batch, width, side, side, generator=generator),
                        torch.randn(batch, width // 8, 4 * side, 4 * side, generator=generator),
                        torch.randn(batch, width // 4, 2 * side, 2 * side, generator=generator))
    seg_hidden = torch.randn(batch, SIZES.llm, generator=generator)
    prompt = ref.text_hidden_fcs(seg_hidden, t)
    args = (feats.image_embedding, feats.feat_s0, feats.feat_s1, prompt)
    _, scores = ref.sam2_masks(*args, t, SIZES.decoder_heads)
    # shift the object-score bias (in the release tensors and the model alike) so that the batch
    # holds object scores on both sides of 0: the release keeps every mask (Sa2VA's SAM2 has no
    # object-score gate), so must hsft
    bias_key = ref.S + "sam_mask_decoder.pred_obj_score_head.layers.2.bias"
    middle = scores.sort().values[batch // 2 - 1: batch // 2 + 1]
    shift = middle.mean()  # halfway between two scores: no score lands on the threshold
    t = {**t, bias_key: t[bias_key] - shift}
    with torch.no_grad():
        model.sam2.mask_decoder.pred_obj_score_head.proj_out.bias.sub_(shift)
        masks = model.decode_masks(feats, seg_hidden)
        torch.testing.assert_close(model.text_hidden_fcs(seg_hidden), prompt)
    want, scores = ref.sam2_masks(*args, t, SIZES.decoder_heads)
    assert 0 < int((scores > 0).sum()) < batch
    assert masks.shape == (batch, SIZES.sam_image, SIZES.sam_image) == (batch, *model.mask_size)
    torch.testing.assert_close(masks, ref.video_resolution(want, SIZES.sam_image), rtol=1e-4, atol=1e-4)


def test_release_conventions_upsample_masks_and_do_not_gate():
    assert Conventions().mask_upsample == "direct" and Conventions.release().mask_upsample == "sam_input"
    assert not Conventions().object_gate and not Conventions.release().object_gate
    with pytest.raises(ValueError, match=r"^conventions.mask_upsample: must be one of direct, sam_input, got 'nearest'$"):
        Conventions.from_dict({"mask_upsample": "nearest"})


def test_hsft_defaults_are_unchanged_for_models_without_conventions(tmp_path):
    from hsft.model import ModelConfig, build_model

    model = build_model(ModelConfig())
    assert model.conventions == Conventions()
    assert model.mask_size == tuple(model.sam2.prompt_encoder.mask_input_size)  # the decoder's own size
    assert isinstance(model.text_hidden_fcs[1], torch.nn.GELU)
    save_model(model, tmp_path / "m")
    meta_path = tmp_path / "m" / "hsft_model.json"
    meta = json.loads(meta_path.read_text())
    del meta["conventions"]  # a directory written before the record existed
    meta_path.write_text(json.dumps(meta))
    assert load_model(str(tmp_path / "m")).conventions == Conventions()
    with pytest.raises(ReleaseError, match="was not imported from a released Sa2VA"):
        export_sa2va(tmp_path / "m", tmp_path / "out")
