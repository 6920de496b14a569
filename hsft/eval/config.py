"""The evaluation's settings (EvalConfig): the two-path evaluation, the comparison and its statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from hsft.errors import check as _check

__all__ = ["EvalConfig", "DEFAULT_TAU"]

# The Dice below which a sample is hard, unless set: the mining stage's default threshold too.
DEFAULT_TAU = 0.75


class _HasTau(Protocol):
    tau: float


@dataclass
class EvalConfig:
    """The two-path evaluation (hsft.eval): forward, [SEG]-in-prompt and generate paths, discrepancy."""

    batch_size: int = field(default=8, metadata={"help": "samples per evaluation batch"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget per sample"})
    overlays: int = field(default=4, metadata={"help": "worst-k samples drawn as overlay pictures"})
    fixed_overlays: int = field(
        default=4, metadata={"help": "first-k samples always drawn as overlays (the same pictures in every stage)"}
    )
    tau: float | None = field(
        default=None,
        metadata={"help": "Dice threshold of the hard/easy label in the flip list and the comparison table (none: "
                          "the mining tau, so evaluation and mining call the same samples hard)",
                  "brief": "Dice threshold of the evaluation's hard/easy label (none: the mining tau)"},
    )
    stable_tolerance: float = field(
        default=0.01, metadata={"help": "checkpoint comparison: |delta Dice| <= this counts as Stable"}
    )
    bootstrap_resamples: int = field(
        default=2000,
        metadata={"help": "paired-bootstrap resamples for the 95 percent interval of a mean Dice difference"},
    )
    bootstrap_seed: int = field(default=0, metadata={"help": "seed of the paired bootstrap"})
    evaluate_start: bool = field(
        default=True,
        metadata={"help": "also evaluate the model the first stage started from (off: only the models the run "
                          "trained, e.g. when the starting model was evaluated already)",
                  "brief": "also evaluate the model the first stage started from"},
    )

    def validate(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.overlays >= 0, "eval.overlays", "must be >= 0")
        _check(self.fixed_overlays >= 0, "eval.fixed_overlays", "must be >= 0")
        if self.tau is not None:
            _check(0 < self.tau <= 1, "eval.tau", f"must lie in (0, 1], got {self.tau}")
        _check(0 <= self.stable_tolerance < 1, "eval.stable_tolerance",
               f"must lie in [0, 1), got {self.stable_tolerance}")
        _check(self.bootstrap_resamples >= 1, "eval.bootstrap_resamples",
               f"must be >= 1, got {self.bootstrap_resamples}")
        _check(self.bootstrap_seed >= 0, "eval.bootstrap_seed", f"must be >= 0, got {self.bootstrap_seed}")

    def following(self, mining: _HasTau) -> EvalConfig:
        """These settings with `tau` following the mining tau unless it was set, so evaluation and mining
        call the same samples hard."""
        return self if self.tau is not None else dataclasses.replace(self, tau=mining.tau)

    @property
    def threshold(self) -> float:
        """The hard/easy threshold in use: `tau`, or the default mining tau when it follows mining."""
        return self.tau if self.tau is not None else DEFAULT_TAU
