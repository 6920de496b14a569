"""Learning-rate schedule: linear warm-up, then cosine annealing from the peak to a floor."""

from __future__ import annotations

import math
import warnings

import torch


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate after `step` optimizer steps (step 0 = the first update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, peak: float,
                    floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR the DeepSpeed engine steps at each accumulation boundary (skipped steps do not count)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, peak, floor) / peak
    )


def move_to_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule where it is after `step` optimizer steps, learning rates included."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": no optimizer step is being skipped here.
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
