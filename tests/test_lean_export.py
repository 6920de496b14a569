"""A training stage writes its model as the tensors it trained over its input directory, without a second
full copy of the model in memory, and that directory loads exactly as the full one a --standalone run
writes from the float32 copy of its input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.model import load_model
from hsft.model.chain import is_lean, write_lean
from hsft.stages import hsft


@pytest.fixture(scope="module")
def pool():
    return [make_fundus(seed=300 + i, size=64) for i in range(6)]


def _mined(make_context, pool, **changes):
    ctx = make_context(SimpleNamespace(train=pool, val=[], test=[]), **changes)
    rows = [{"id": s.id, "dice": i / 10, "bucket": "x", "seg_emitted": True} for i, s in enumerate(pool)]
    ctx.stage_dir("mining").mkdir(parents=True)
    (ctx.stage_dir("mining") / "hard_samples.json").write_text(json.dumps({"hard": rows[:3], "all": rows}))
    return ctx


def _trained_model(make_context, pool, tiny_model_dir, tmp_path, name, **changes):
    torch.manual_seed(0)
    ctx = _mined(make_context, pool, output_dir=str(tmp_path / name), **changes)
    cfg = HSFTStageConfig(train=TrainConfig(epochs=1, micro_batch=1, grad_accum=1, lr=1e-2))
    result = hsft.run(ctx, cfg, tiny_model_dir)
    return result.model_dir, ctx.stage_dir("hsft")


def test_hsft_writes_its_trained_tensors_over_its_input_and_loads_as_the_full_copy(
        pool, tmp_path, make_context, tiny_model_dir, monkeypatch):
    loads = []

    def counting_load(directory, **kwargs):
        loads.append((str(directory), kwargs.get("dtype")))
        return load_model(directory, **kwargs)

    monkeypatch.setattr(hsft, "load_model", counting_load)
    lean_dir, stage_dir = _trained_model(make_context, pool, tiny_model_dir, tmp_path, "lean")
    # The stage loaded its input once, to train it; no float32 copy was built for the export.
    assert len(loads) == 1, loads
    assert is_lean(lean_dir)
    trained = load_file(str(stage_dir / "trainable.safetensors"))
    delta = load_file(str(lean_dir / "delta.safetensors"))
    assert set(delta) == {name.removeprefix("model.") for name in trained}

    full_dir, _ = _trained_model(make_context, pool, tiny_model_dir, tmp_path, "full", standalone=True)
    assert not is_lean(full_dir)
    lean, full = load_model(lean_dir).state_dict(), load_model(full_dir).state_dict()
    assert lean.keys() == full.keys()
    changed = [name for name in lean if not torch.equal(lean[name], full[name])]
    assert not changed, changed[:5]
    # ... and the training did change the model it wrote
    start = load_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(lean[name], start[name]) for name in delta)


def test_a_narrowing_lean_directory_is_not_written(tmp_path, tiny_model_dir):
    weights = {"text_hidden_fcs.0.weight": torch.zeros(1)}
    # float32 input, bfloat16 delta: the frozen tensors would not load back as they came in
    assert not write_lean(tmp_path / "m", tiny_model_dir, weights, dtype="bfloat16")
    assert not (tmp_path / "m").exists()
