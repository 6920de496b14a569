"""Lean model directories: only the changed tensors plus a reference to the input model, loading follows
the chain bit for bit, a replaced input is refused, and a standalone export is self-contained."""

from __future__ import annotations

import shutil

import pytest
import torch

from hsft.model import build_model, load_model, save_model
from hsft.model.chain import DELTA_FILE, chain_of, is_lean, make_lean
from hsft.model.checkpoint import export_standalone
from hsft.model.config import ModelConfig


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lean_chain_loads_bit_for_bit_and_standalone_export(tmp_path):
    base = build_model(ModelConfig(preset="tiny"), seed=0)
    save_model(base, tmp_path / "a")
    stage_b = load_model(tmp_path / "a")
    with torch.no_grad():
        stage_b.text_hidden_fcs[0].weight.add_(1.0)
    save_model(stage_b, tmp_path / "b")
    stage_c = load_model(tmp_path / "b")
    with torch.no_grad():
        next(stage_c.sam2.mask_decoder.parameters()).mul_(2.0)
    save_model(stage_c, tmp_path / "c")
    full_c = _size(tmp_path / "c")

    assert make_lean(tmp_path / "b", tmp_path / "a", load_model) == 1
    assert make_lean(tmp_path / "c", tmp_path / "b", load_model) == 1
    assert is_lean(tmp_path / "c") and sorted(p.name for p in (tmp_path / "c").iterdir()) == [DELTA_FILE,
                                                                                              "hsft_model.json"]
    assert _size(tmp_path / "c") < full_c / 10
    assert chain_of(tmp_path / "c") == [(tmp_path / n).resolve() for n in ("c", "b", "a")]
    loaded = load_model(tmp_path / "c")
    expected = stage_c.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    # A lean directory copied elsewhere alone still finds its input (by the absolute path).
    shutil.copytree(tmp_path / "c", tmp_path / "elsewhere" / "deeper" / "c")
    copied = load_model(tmp_path / "elsewhere" / "deeper" / "c")
    assert all(torch.equal(t, expected[n]) for n, t in copied.state_dict().items())
    shutil.rmtree(tmp_path / "elsewhere")

    # The run directory moves as a whole: references are relative.
    shutil.move(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "_moved")))
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    export_standalone(moved / "c", moved / "c_standalone")
    shutil.rmtree(moved / "a")
    with pytest.raises(FileNotFoundError, match="input model .* is missing.*--standalone"):
        load_model(moved / "c")
    alone = load_model(moved / "c_standalone")
    assert all(torch.equal(t, expected[n]) for n, t in alone.state_dict().items())


def test_a_replaced_input_model_is_refused(tmp_path):
    save_model(build_model(ModelConfig(preset="tiny"), seed=0), tmp_path / "a")
    model = load_model(tmp_path / "a")
    with torch.no_grad():
        model.text_hidden_fcs[0].bias.add_(1.0)
    save_model(model, tmp_path / "b")
    make_lean(tmp_path / "b", tmp_path / "a", load_model)
    save_model(build_model(ModelConfig(preset="tiny"), seed=1), tmp_path / "a")  # e.g. --overwrite
    with pytest.raises(ValueError, match="was replaced after this directory was written"):
        load_model(tmp_path / "b")


def test_a_changed_tied_embedding_is_stored_once_and_loads_back(tmp_path):
    base = build_model(ModelConfig(preset="tiny"), seed=0)
    assert base.vlm.lm_head.weight.data_ptr() == base.vlm.get_input_embeddings().weight.data_ptr()  # tied
    save_model(base, tmp_path / "a")
    changed = load_model(tmp_path / "a")
    with torch.no_grad():
        changed.vlm.get_input_embeddings().weight[changed.seg_token_id].add_(0.5)  # as the [SEG] row trains
    save_model(changed, tmp_path / "b")
    assert make_lean(tmp_path / "b", tmp_path / "a", load_model) == 1
    loaded = load_model(tmp_path / "b")
    assert torch.equal(loaded.vlm.get_input_embeddings().weight, changed.vlm.get_input_embeddings().weight)
    assert torch.equal(loaded.vlm.lm_head.weight, changed.vlm.lm_head.weight)
