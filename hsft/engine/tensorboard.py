"""A thin TensorBoard writer: rank 0 writes, every other rank gets a no-op."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np


class TBWriter:
    def __init__(self, log_dir: str | Path | None, enabled: bool = True):
        self._writer = None
        self._log_dir = log_dir
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)

    def image(self, name: str, image_hwc: np.ndarray, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(name, image_hwc, step, dataformats="HWC")

    def histogram(self, name: str, values, step: int) -> None:
        if self._writer is not None:
            self._writer.add_histogram(name, np.asarray(values, dtype=np.float64), step)

    def text(self, name: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(name, text, step)

    def hparams(self, settings: Mapping[str, float | str], metrics: Mapping[str, float], run_name: str) -> None:
        """One run of a grid in TensorBoard's HParams tab: its settings and the metrics they gave."""
        if self._writer is not None:
            self._writer.add_hparams(dict(settings), {k: float(v) for k, v in metrics.items()}, run_name=run_name)

    def purge_from(self, step: int) -> None:
        """Hide every event logged at `step` or later by an earlier writer of this directory (a run that was
        interrupted after its last checkpoint): TensorBoard drops them when it reads the files."""
        if self._writer is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer.close()
        self._writer = SummaryWriter(log_dir=str(self._log_dir), purge_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
