"""launch/convert.py: the two commands end to end, and bad input stopped with one line before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch_scripts import launch_main
from release_checkpoints import write_release, write_sam2_config


@pytest.fixture(scope="module")
def convert():
    return launch_main("convert")


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    return write_sam2_config(tmp_path_factory.mktemp("cfg") / "sam2.json")


def _run_error(convert, capsys, argv) -> str:
    assert convert(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("launch/convert.py: error: ")
    return err[0]


def test_import_then_export_from_the_command_line(tmp_path, convert, capsys, sam2_file):
    src, tensors = write_release(tmp_path / "src", shards=2)
    assert convert(["import-sa2va", str(src), str(tmp_path / "model"), "--sam2-config", sam2_file,
                    "--dtype", "float32"]) == 0
    assert "kept beside the model" in capsys.readouterr().out
    meta = json.loads((tmp_path / "model" / "hsft_model.json").read_text())
    assert meta["dtype"] == "float32" and meta["conventions"]["decoder_prompt"] == "padded"
    assert convert(["export-sa2va", str(tmp_path / "model"), str(tmp_path / "out")]) == 0
    exported = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(path))
    assert all(torch.equal(exported[key], value) and exported[key].dtype == value.dtype
               for key, value in tensors.items())
    capsys.readouterr()
    error = _run_error(convert, capsys, ["export-sa2va", str(tmp_path / "model"), str(tmp_path / "out")])
    assert "output directory exists and is not empty" in error


def test_unrecognised_tensors_are_kept_and_reported(tmp_path, convert, capsys, sam2_file):
    src, _ = write_release(tmp_path / "src")
    extra = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    _rewrite_tensors(src, lambda t: t.update({"language_model.model.rotary_emb.inv_freq": extra}))
    assert convert(["import-sa2va", str(src), str(tmp_path / "model"), "--sam2-config", sam2_file]) == 0
    report = json.loads((tmp_path / "model" / "conversion_report.json").read_text())
    assert report["unrecognised"] == ["language_model.model.rotary_emb.inv_freq"]
    assert "Not recognised (1)" in (tmp_path / "model" / "conversion_report.md").read_text()
    assert convert(["export-sa2va", str(tmp_path / "model"), str(tmp_path / "out")]) == 0
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["language_model.model.rotary_emb.inv_freq"],
                       extra)


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _rewrite_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


BAD_INPUTS = {
    "not a directory": (lambda d: None, "checkpoint directory does not exist"),
    "no config": (lambda d: (d / "config.json").unlink(), "not a Sa2VA checkpoint directory (no config.json)"),
    "plain InternVL": (lambda d: _edit_config(d, lambda c: c.update(model_type="internvl_chat")),
                       "not a Sa2VA checkpoint: model_type is 'internvl_chat'"),
    "unsupported LLM": (lambda d: _edit_config(d, lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"])),
                        "unsupported LLM architecture 'Phi3ForCausalLM'"),
    "v1 pixel shuffle": (lambda d: _edit_config(d, lambda c: c.update(ps_version="v1")), "ps_version 'v1'"),
    "mis-shaped tensor": (lambda d: _rewrite_tensors(d, lambda t: t.update(
        {"vision_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(65, 32, dtype=torch.bfloat16)})),
        "tensor 'vision_model.encoder.layers.1.mlp.fc1.weight' has shape [65, 32], expected [64, 32]"),
    "missing tensor": (lambda d: _rewrite_tensors(d, lambda t: t.pop(
        "grounding_encoder.sam2_model.sam_mask_decoder.conv_s1.bias")),
        "'grounding_encoder.sam2_model.sam_mask_decoder.conv_s1.bias'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_release_is_refused_in_one_line_before_any_work(tmp_path, convert, capsys, sam2_file, case):
    edit, message = BAD_INPUTS[case]
    src = tmp_path / "src"
    if case != "not a directory":
        write_release(src)
        edit(src)
    out = tmp_path / "model"
    error = _run_error(convert, capsys, ["import-sa2va", str(src), str(out), "--sam2-config", sam2_file])
    assert message in error and str(src) in error
    assert not out.exists()


def test_tokenizer_without_seg_and_missing_shards(tmp_path, convert, capsys, sam2_file):
    src, _ = write_release(tmp_path / "noseg", with_seg=False)
    error = _run_error(convert, capsys, ["import-sa2va", str(src), str(tmp_path / "a"), "--sam2-config", sam2_file])
    assert "the tokenizer has no [SEG] token" in error
    src, _ = write_release(tmp_path / "sharded", shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    error = _run_error(convert, capsys, ["import-sa2va", str(src), str(tmp_path / "b"), "--sam2-config", sam2_file])
    assert "1 shard(s) listed in the index are missing: model-00002-of-00003.safetensors" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sam2_sizes_default_to_hiera_large(tmp_path, convert, capsys):
    """Without --sam2-config the tiny SAM2 contradicts the release's Hiera-L: stopped by tensor name."""
    src, _ = write_release(tmp_path / "src")
    error = _run_error(convert, capsys, ["import-sa2va", str(src), str(tmp_path / "model")])
    assert re.search(r"tensor 'grounding_encoder\.sam2_model\.[\w.]+' has shape \[[\d, ]+\], expected "
                     r"\[[\d, ]+\] from the configuration", error), error
    error = _run_error(convert, capsys, ["import-sa2va", str(src), str(tmp_path / "model"),
                                         "--sam2-config", str(tmp_path / "missing.json")])
    assert "--sam2-config" in error and "does not exist" in error
