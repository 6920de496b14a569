"""The training loop's own settings (TrainConfig): what every training stage's DeepSpeed loop takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hsft.errors import check as _check

__all__ = ["TrainConfig", "PRECISIONS", "STAGE_TRAIN_FIELDS"]

# The one precision vocabulary: the names --precision and --base-precision take (and the DeepSpeed
# config's bf16 switch means), each with the torch dtype a run in it trains and infers in.
PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}

# Where training stages really differ, each stage has its own option (--hsft-lr ...); every other
# TrainConfig field is one run-wide setting (--train-weight-decay, --set train.min_lr=...) over the stages'
# own values.
STAGE_TRAIN_FIELDS = ("epochs", "micro_batch", "grad_accum", "lr")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training stage's DeepSpeed loop."""

    epochs: int = field(default=1, metadata={"help": "passes over the stage's training set"})
    micro_batch: int = field(default=1, metadata={"help": "samples per rank per forward/backward"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-7, metadata={"help": "cosine schedule floor"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of optimizer steps spent in linear warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not applied to biases and norms)"})
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = field(default=1.0, metadata={"help": "global gradient-norm clipping threshold (0 disables)"})
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "consecutive skipped (non-finite) optimizer steps before the stage stops (--resume restarts from the last finished epoch)"},
    )
    log_every: int = field(default=1, metadata={"help": "optimizer steps between TensorBoard scalar writes"})

    def validate(self, prefix: str = "train") -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.micro_batch >= 1, f"{prefix}.micro_batch", f"must be >= 1, got {self.micro_batch}")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"{prefix}.lr", f"must be a positive number, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        _check(0 <= self.warmup_ratio < 1, f"{prefix}.warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip >= 0, f"{prefix}.clip", f"must be >= 0, got {self.clip}")
        _check(self.max_nonfinite_steps >= 1, f"{prefix}.max_nonfinite_steps", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size
