"""The rehearsal of the paper's run (launch/rehearse.py) at the tiny shape, through the same code and the
same commands as at the published sizes; the release builder it starts from; what it found (export of
a stage's lean model directory); the per-stage measurement the pipeline records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hsft.bench.rehearsal import DATASET_SIZES, RELEASE_TILE, build_shape_model, image_plan
from hsft.engine.resources import measure
from hsft.model import load_model, save_model
from hsft.model.chain import is_lean, make_lean
from hsft.model.chat import IGNORE_INDEX
from hsft.model.release import export_sa2va, import_sa2va
from hsft.model.release.builder import release_state, sam2_config_json, write_release_checkpoint
from hsft.model.tiling import TileSettings, tile_count

from launch_scripts import launch_main


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model = build_shape_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    write_release_checkpoint(model, root / "src", dtype=torch.float32, shards=2)
    sam2 = sam2_config_json(model, root / "sam2.json")
    import_sa2va(root / "src", root / "imported", sam2_config_file=str(sam2))
    return model, root


def test_the_builder_writes_a_release_that_imports_back_bit_for_bit(tiny_release):
    model, root = tiny_release
    config = json.loads((root / "src" / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat" and config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    index = json.loads((root / "src" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    names = set(index["weight_map"])
    # the release's own names: fused InternViT qkv, SAM2's original module names, text_hidden_fcs
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in names
    assert "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight" in names
    assert "text_hidden_fcs.0.weight" in names and "mlp1.1.weight" in names
    imported = load_model(root / "imported")
    ours, theirs = model.state_dict(), imported.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def test_release_state_has_no_tensor_twice(tiny_release):
    model, _ = tiny_release
    state = release_state(model)
    assert not any(".attention.k_proj." in k or "shared_image_embedding" in k for k in state)
    assert sum(k.endswith("point_embeddings.0.weight") for k in state) == 1


def test_export_of_a_lean_stage_directory(tiny_release, tmp_path):
    """A stage's model directory holds only its changes over its input model (the default); exporting it
    must find the release's layout through that chain and carry the change."""
    _, root = tiny_release
    model = load_model(root / "imported")
    with torch.no_grad():
        model.text_hidden_fcs[0].weight.add_(1.0)
    stage = tmp_path / "hsft" / "model"
    save_model(model, stage)
    make_lean(stage, root / "imported", load_model)
    assert is_lean(stage) and not (stage / "release").exists()
    out = export_sa2va(stage, tmp_path / "exported")
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    assert torch.equal(tensors["text_hidden_fcs.0.weight"], model.text_hidden_fcs[0].weight)


def test_images_get_the_release_tile_counts_at_any_tile_size():
    settings = TileSettings(1, 12, True)
    expected = {"DRIVE": 1, "STARE": 5, "CHASE_DB1": 10}
    for name, (h, w) in DATASET_SIZES.items():
        assert tile_count(w, h, RELEASE_TILE, settings) == expected[name]
    for tile in (RELEASE_TILE, 64):
        plan = image_plan(8, tile)
        assert len(plan["test"]) == 2 and len(plan["train"]) == 6
        assert {tile_count(w, h, tile, settings) for _, h, w in plan["train"] + plan["test"]} == {1, 5, 10}


def test_measure_resets_the_host_peak_per_block():
    with measure() as first:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
        del block
    with measure() as second:
        pass
    assert first.host_peak_reset and first.seconds >= 0
    assert first.peak_host_gib - second.peak_host_gib > 0.04


@pytest.mark.slow
def test_tiny_rehearsal_end_to_end(tmp_path, capsys):
    out = tmp_path / "rehearsal"
    code = launch_main("rehearse")(["--shape", "tiny", "--images", "4", "--output-dir", str(out),
                                     "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "rehearsal.json").read_text())
    assert summary["passed"] and summary["round_trip"]["identical_to_release_dtype"]
    steps = {row["step"]: row for row in summary["steps"]}
    for stage in ("write release", "import-sa2va", "lora", "dpo", "mining", "hsft", "control", "eval",
                  "export-sa2va", "re-import", "mask check"):
        assert stage in steps, stage
        assert steps[stage]["seconds"] > 0 and steps[stage]["peak_host_gib"] > 0.05
    assert steps["hsft"]["evidence"] and steps["lora"]["disk_gib"] > 0
    # a multi-tile image reached the model: the CHASE_DB1-sized one is cut into 9 tiles and a thumbnail
    assert max(t["tiles"] for t in summary["tokens"].values()) == 10
    # the plan was printed by the main command and stands beside each stage's measured peak
    plan = summary["memory_plan"]["stages"]
    for stage in ("lora", "dpo", "mining", "hsft", "control", "eval"):
        ratio = plan[stage]["host_gib"] / steps[stage]["peak_host_gib"]
        assert 0.6 < ratio < 1.6, (stage, ratio)
    text = (out / "rehearsal.md").read_text()
    assert "| lora |" in text and "plan / measured" in text and "identical" in text
    # a stage's DeepSpeed checkpoint holds what it trains, not the frozen LM head tied to the embedding
    ckpt = next((out / "run" / "hsft" / "checkpoints").glob("*/mp_rank_00_model_states.pt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
    assert "model.vlm.lm_head.weight" not in saved and not any("language_model" in k for k in saved)
    assert any(k.startswith("model.text_hidden_fcs.") for k in saved)
    # a rehearsal stopped during the main command: its finished stages, the plan of this code beside them
    run = out / "run"
    resources = json.loads((run / "resources.json").read_text())
    resources["stages"] = {k: v for k, v in resources["stages"].items() if k in ("lora", "dpo")}
    (run / "resources.json").write_text(json.dumps(resources))
    (run / "report.json").unlink()
    summary["steps"] = [row for row in summary["steps"] if row["step"] in ("write release", "import-sa2va", "data")]
    del summary["round_trip"]
    (out / "rehearsal.json").write_text(json.dumps(summary))
    assert launch_main("rehearse")(["--summarise", str(out)]) == 0
    text = (out / "rehearsal.md").read_text()
    assert "Stopped during the main command, after 2 of 6 stages" in text and "| dpo |" in text
    assert "| mining |" not in text and "recomputed after the run" in text


def test_bad_arguments_are_one_line(tmp_path, capsys):
    main = launch_main("rehearse")
    assert main(["--shape", "tiny", "--images", "2", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["launch/rehearse.py: error: --images: at least 4 (two held out, two to train on and validate), "
                   "got 2"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert main(["--shape", "tiny", "--output-dir", str(tmp_path / "full")]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_lora_loss_never_forms_the_logits_of_every_position():
    """The LM loss of a training step applies the LM head to the labelled positions only, and equals the
    loss (and gradient) through the full logits; the full (B, L, vocab) logits grow with the image's tiles."""
    model = build_shape_model("tiny", device=torch.device("cpu"), dtype=torch.float32).train()
    from hsft.data.synthetic import make_fundus

    pictures = [make_fundus(seed, 137).image for seed in (1, 2)]  # 10 tiles each at the tiny tile
    images = model.preprocess(pictures)
    tokens = model.tokenize(2, form="response", tiles=images.num_tiles)
    rows = []
    hook = model.vlm.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:-1].numel()))
    full = model.forward_seg(images, tokens, compute_lm_loss=True)
    (grad_full,) = torch.autograd.grad(full.lm_loss, model.vlm.model.language_model.norm.weight)
    lean = model.forward_seg(images, tokens, compute_lm_loss=True, full_lm_logits=False)
    (grad_lean,) = torch.autograd.grad(lean.lm_loss, model.vlm.model.language_model.norm.weight)
    hook.remove()
    labelled = int((tokens.labels[:, 1:] != IGNORE_INDEX).sum())
    assert rows == [tokens.input_ids.numel(), labelled] and labelled < tokens.input_ids.numel() // 20
    assert lean.lm_logits is None
    torch.testing.assert_close(lean.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_lean, grad_full, rtol=1e-4, atol=1e-6)


def test_a_float32_stage_over_a_bfloat16_import_stays_lean(tmp_path):
    """Training an imported bfloat16 release writes the stage's model in float32; it must still store only
    the tensors the stage changed (a full copy is 4 GB per stage at Sa2VA-1B) and load back bit for bit."""
    model = build_shape_model("tiny", device=torch.device("cpu"), dtype=torch.bfloat16)
    save_model(model, tmp_path / "imported")
    trained = load_model(tmp_path / "imported", dtype="float32")
    with torch.no_grad():
        trained.text_hidden_fcs[0].weight.add_(1e-3)
    save_model(trained, tmp_path / "stage")
    kept = make_lean(tmp_path / "stage", tmp_path / "imported", load_model)
    assert is_lean(tmp_path / "stage") and kept == 1
    again = load_model(tmp_path / "stage")
    assert again.dtype == torch.float32
    ours, theirs = trained.state_dict(), again.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_step_shares_time_every_part(tiny_release, tmp_path):
    from hsft.bench.rehearsal import step_shares, write_images

    _, root = tiny_release
    written = write_images(tmp_path / "data", {"test": [("CHASE_DB1", 137, 143)]})
    path = tmp_path / "data" / "test" / "images" / f"{written[0]['id']}.png"
    (row,) = step_shares(root / "imported", [path], device=torch.device("cpu"), dtype=torch.float32, steps=1)
    assert row["tiles"] == 10 and row["step_s"] > 0
    assert all(share > 0 for share in row["share"].values()), row
    assert sum(row["share"].values()) == pytest.approx(1.0)
