"""Shared test settings and fixtures: the tiny model, a saved tiny model directory, a run context.

Helpers that are not fixtures live beside this file: forcing.py (logits processors that force or
forbid tokens in generation) and plain_checkpoints.py (tiny checkpoints in the formats users bring).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsft.config import RunConfig, replace_nested
from hsft.engine.context import RunContext
from hsft.engine.ds_config import load_ds_config
from hsft.model import ModelConfig, build_model, save_model

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "ds_configs" / "zero2.json"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tiny models' tensors gain nothing from intra-op threads; on shared CI cores the threads mostly
    wait for each other (measured: 5x slower under load), so each test module runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0):
    """A fresh tiny-preset model (float32, eval mode)."""
    return build_model(ModelConfig(preset="tiny"), seed=seed)


@pytest.fixture(scope="session")
def make_tiny_model():
    """make_tiny_model(seed=0) -> a fresh tiny model, for tests that need several."""
    return tiny


@pytest.fixture
def tiny_model():
    """A fresh tiny model for a test that may change it."""
    torch.manual_seed(0)
    return tiny()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model (seed 0) saved as an hsft model directory; read-only for tests."""
    directory = tmp_path_factory.mktemp("tiny_model") / "model"
    save_model(tiny(), directory)
    return directory


@pytest.fixture
def make_context(tmp_path):
    """make_context(splits=None, **changes) -> a RunContext writing under tmp_path/run, built the way the
    main command builds it; `changes` are dotted RunConfig fields (e.g. precision="fp32")."""

    def build(splits=None, **changes) -> RunContext:
        changes.setdefault("output_dir", str(tmp_path / "run"))
        changes.setdefault("precision", "fp32")
        cfg = replace_nested(RunConfig(), **changes)
        return RunContext.build(cfg, load_ds_config(ZERO2), splits=splits)

    return build
