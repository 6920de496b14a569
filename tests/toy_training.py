"""The shared DeepSpeed loop on a toy regression task (y = w.x + b, 16 samples), for tests of the loop,
its checkpoints and its resume."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hsft.config import TrainConfig
from hsft.engine.loop import train
from hsft.engine.tensorboard import TBWriter

from contexts import build_context
from launch_scripts import REPO


class ToyModule(nn.Module):
    """y = w.x + b with a loss that can be poisoned (NaN) for chosen samples."""

    def __init__(self, poison: set[int] | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.poison = poison or set()

    def forward(self, batch):
        x, y, ids = batch
        err = (self.linear(x).squeeze(-1) - y).float()
        loss = (err ** 2).mean()
        if any(i in self.poison for i in ids):
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}


class ToyTask:
    name = "toy"

    def __init__(self, n: int = 16, poison: set[int] | None = None, scale: float = 1.0):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g) * scale
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        self.module = ToyModule(poison)

    def __len__(self):
        return len(self.x)

    def make_batch(self, indices, dtype, device):
        return self.x[indices].to(device, dtype), self.y[indices].to(device, dtype), list(indices)

    def evaluate(self, module):
        with torch.no_grad():
            dtype = next(module.parameters()).dtype
            err = module.linear(self.x.to(dtype)).squeeze(-1).float() - self.y
        return {"mse": float((err ** 2).mean())}

    def client_state(self):
        return {"note": "toy"}


def run(tmp: Path, cfg: TrainConfig, task=None, resume=False, precision="fp32", config="zero2.json", keep=1):
    """train() on `task` (a fresh ToyTask unless given) writing under `tmp`, run seed 3: (TrainResult, task)."""
    task = task or ToyTask()
    ctx = build_context(tmp, ds_config=REPO / "ds_configs" / config, seed=3, precision=precision, resume=resume,
                        keep_checkpoints=keep)
    return train(task, cfg, ctx, stage_dir=tmp, tb=TBWriter(tmp / "tb")), task
