"""Run contexts for tests, built the way the main command builds them: RunContext.build from a RunConfig
and the loaded --deepspeed file."""

from __future__ import annotations

from pathlib import Path

from hsft.config import RunConfig, replace_nested
from hsft.engine.context import RunContext
from hsft.engine.ds_config import load_ds_config

from launch_scripts import ZERO2


def build_context(output_dir: Path, *, ds_config: Path = ZERO2, splits=None, **changes) -> RunContext:
    """The RunContext of a run writing under `output_dir`; `changes` are dotted RunConfig fields (e.g.
    precision="bf16", **{"mining.batch_size": 4}); precision is fp32 unless changed."""
    changes.setdefault("precision", "fp32")
    cfg = replace_nested(RunConfig(), output_dir=str(output_dir), **changes)
    return RunContext.build(cfg, load_ds_config(ds_config), splits=splits)
