"""The run context: everything the stages share, resolved once when the main command starts.

Built by `hsft.pipeline` and handed to every stage, so no stage re-reads the DeepSpeed file, resolves
the precision again or guesses the device:

    out_dir      the run's output directory (a stage writes `out_dir/<stage>/`, TensorBoard `out_dir/tb/`)
    ds_config    the --deepspeed file's contents with the run's precision written in
    precision    "bf16" or "fp32": the one place the --precision override and the config are reconciled
    device       this rank's accelerator (cuda:LOCAL_RANK), or the CPU where there is none
    seed, resume from the RunConfig
    keep_checkpoints  how many epoch checkpoints a training stage keeps
    inference    how the generate path runs wherever a stage runs it (DPO pairs, validation)
    splits       the data: train / val (epoch metrics) / test (held out, evaluation only)
    global_step  the run-wide TensorBoard step the stage starts at: the pipeline owns the count and
                 hands each stage a copy at its step (`at_step`); a stage returns where it ended

Nothing is added to it while the run goes: what a stage needs from earlier stages (the models the
evaluation scores) is passed to that stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hsft.engine import distributed
from hsft.engine.config import PRECISIONS
from hsft.engine.ds_config import DeepSpeedConfigError, apply_precision, precision_of
from hsft.engine.tensorboard import TBWriter

if TYPE_CHECKING:
    # The run's settings are built above this layer (hsft.config) and only read here: a type, not an import.
    from hsft.config import RunConfig
    from hsft.data import DataSplits

DTYPES = {name: getattr(torch, dtype) for name, dtype in PRECISIONS.items()}
# The embedded default on a machine without an accelerator trains in fp32 unless --precision says
# otherwise: CPUs run bf16 3-4x slower than fp32, and that run is there to show every stage at work
# within minutes; the bf16 path is tested on its own, and GPUs follow the DeepSpeed config.
CPU_EMBEDDED_DEFAULT_PRECISION = "fp32"


def run_precision(cfg: RunConfig, ds_file_config: dict, device: torch.device) -> str:
    """The precision a run trains and infers in: --precision, else fp32 for the embedded default on a
    CPU, else the DeepSpeed config's."""
    if cfg.precision:
        return cfg.precision
    if cfg.embedded_default and device.type == "cpu":
        return CPU_EMBEDDED_DEFAULT_PRECISION
    return precision_of(ds_file_config)


@dataclass(frozen=True)
class InferenceSettings:
    """The run-wide inference settings: samples per generate call and the generation budget per sample."""

    batch_size: int
    max_new_tokens: int


@dataclass
class RunContext:
    cfg: RunConfig
    out_dir: Path
    ds_config: dict
    precision: str
    device: torch.device
    inference: InferenceSettings
    keep_checkpoints: int = 1
    splits: DataSplits | None = None
    global_step: int = 0

    @classmethod
    def build(cls, cfg: RunConfig, ds_file_config: dict, splits: DataSplits | None = None) -> RunContext:
        """The context of one run: `ds_file_config` is the --deepspeed file as loaded; `cfg.precision`,
        when set, overrides its precision (the embedded default on a CPU: fp32 unless set)."""
        device = distributed.local_device()
        precision = run_precision(cfg, ds_file_config, device)
        if precision not in DTYPES:
            raise DeepSpeedConfigError(f"--deepspeed {cfg.deepspeed}: {precision} is not supported (no loss scaling "
                                       "here); enable bf16 or neither, or pass --precision bf16|fp32")
        return cls(cfg=cfg, out_dir=Path(cfg.output_dir), ds_config=apply_precision(ds_file_config, precision),
                   precision=precision, device=device, keep_checkpoints=cfg.keep_checkpoints,
                   # One value across the run: the shared inference setting writes it into mining's fields.
                   inference=InferenceSettings(cfg.mining.batch_size, cfg.mining.max_new_tokens), splits=splits)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def resume(self) -> bool:
        return self.cfg.resume

    @property
    def dtype(self) -> torch.dtype:
        """The dtype DeepSpeed trains in, and the one inference runs in."""
        return DTYPES[self.precision]

    def with_precision(self, precision: str) -> RunContext:
        """The same run in another precision (stage 0 pre-trains in fp32 whatever the run uses)."""
        return dataclasses.replace(self, precision=precision, ds_config=apply_precision(self.ds_config, precision))

    def at_step(self, global_step: int) -> RunContext:
        """The same run with the run-wide step at `global_step` (what the pipeline hands a stage)."""
        return dataclasses.replace(self, global_step=global_step)

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def tb(self, name: str) -> TBWriter:
        return TBWriter(self.out_dir / "tb" / name, enabled=distributed.is_main())
