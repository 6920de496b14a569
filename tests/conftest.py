"""Shared test settings and fixtures: the tiny model, a saved tiny model directory, a run context.

Helpers that are not fixtures live beside this file and are imported by module name (`from launch_scripts
import REPO`): launch_scripts.py (the repository's paths, running launch/ scripts in-process or under the
DeepSpeed launcher), contexts.py (run contexts), toy_training.py (the loop on a toy task), forcing.py
(logits processors that force or forbid tokens in generation), plain_checkpoints.py and
release_checkpoints.py (tiny checkpoints in the formats users bring), release_reference.py (a released
Sa2VA's forward computations written from its raw tensors).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hsft.engine.context import RunContext
from hsft.model import ModelConfig, build_model, save_model

from contexts import build_context


@pytest.fixture(scope="session", autouse=True)
def _own_stage0_cache(tmp_path_factory):
    """The pre-trained stage 0 is cached under $HSFT_CACHE (default ~/.cache/hsft) and trained in place; a
    cache per test session (per pytest-xdist worker) keeps parallel workers from training into one
    directory, and a user's cache out of the tests. Tests that launch a run give it its own as well."""
    saved = os.environ.get("HSFT_CACHE")
    os.environ["HSFT_CACHE"] = str(tmp_path_factory.mktemp("hsft_cache"))
    yield
    if saved is None:
        del os.environ["HSFT_CACHE"]
    else:
        os.environ["HSFT_CACHE"] = saved


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
        return build_context(changes.pop("output_dir", tmp_path / "run"), splits=splits, **changes)

    return build


@pytest.fixture
def command_dir(tmp_path, monkeypatch) -> Path:
    """tmp_path, set up for running a launch/ script's main() in-process as a user would from that directory:
    the working directory, a stage-0 cache of its own (HSFT_CACHE), and errors as one line (no HSFT_DEBUG)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HSFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HSFT_DEBUG", raising=False)
    return tmp_path
