"""The experiment suites: which tables a suite fills and which runs ("arms") each table needs.

Every seed runs one *prefix*: the main pipeline from the starting model through LoRA, DPO, mining, HSFT,
the matched-compute control and the evaluation. Its stages fill the per-stage table and the per-sample
table, and its HSFT and control serve as the rows of every other table whose settings equal the prefix's.
Every other row is an *arm*: one fine-tuning stage (HSFT with other settings, or a variant stage beside
HSFT) from the prefix's DPO model, in an ordinary run directory of its own, evaluated on the same
held-out split. An arm re-mines only when its mining settings differ (tau, a quantile); otherwise it
reuses the prefix's mining.

Every row that trains on a subset (a tau, a fraction of the hard set, the k hardest, a quantile) has its
own control: the control stage with the row's settings, i.e. a seeded random training subset of the row's
subset size, trained from the same model with the same steps and schedule, reading the row's hard set. A
row's verdict is against its control ("a smaller, harder set helps" against "fewer steps help"). The
easy-only control trains on a random subset of the easy samples (disjoint from the hard set), and the
U-Net reference row is a plain MONAI U-Net trained on the same training split.

The learning-rate grid is the published one {1e-6, 5e-6, 1e-5, 5e-5} scaled by the ratio of the run's
HSFT learning rate to the published 1e-5 (the identity for the paper recipe); the table says which grid ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hsft.config import RunConfig, replace_nested
from hsft.errors import BadValue

__all__ = ["Arm", "Table", "Suite", "SUITES", "build_suite", "PUBLISHED_HSFT_LR"]

PUBLISHED_HSFT_LR = 1e-5
PAPER_LR_GRID = (1e-6, 5e-6, 1e-5, 5e-5)
PAPER_TAUS = (0.60, 0.70, 0.75, 0.80)
PAPER_EPOCHS = (1, 3, 5, 7)
PAPER_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
HARDEST_K = 8
QUANTILE = 0.25
ROUNDS = 2


@dataclass(frozen=True)
class Arm:
    """One row of a table. `name` is its run directory below `seed<s>/`; `stage` the stage it trains
    (hsft or a variant beside it); `overrides` dotted RunConfig fields; `remine`: its mining settings differ
    from the prefix's. `same_as` names a prefix stage whose settings the row has (no run of its own);
    `value` is the row's x value in a grid plot; `train_dice`: also measure the training split's Dice.
    `control`: the row's own random-subset control (an arm run right after it); `mining_from`: the arm whose
    hard set this one reads (default the prefix's)."""

    name: str
    label: str
    stage: str = "hsft"
    overrides: tuple[tuple[str, object], ...] = ()
    remine: bool = False
    same_as: str | None = None
    value: float | None = None
    train_dice: bool = False
    control: Arm | None = None
    mining_from: str | None = None
    evaluated_by_stage: bool = False  # the stage scores its own model (the U-Net): no evaluation stage after it

    def with_control(self) -> Arm:
        """This subset row with its random-subset control of the same size, steps and schedule."""
        if self.same_as == "hsft":  # the prefix's own HSFT: its control is the prefix's
            control = Arm("control", "random subset (the prefix's control)", stage="control", same_as="control")
        else:
            control = Arm(f"{self.name}-control", f"random subset, the size of {self.label}", stage="control",
                          overrides=self.overrides, mining_from=self.name if self.remine else None)
        return dataclasses.replace(self, control=control)


@dataclass(frozen=True)
class Table:
    """A table of the study. kind: "stages" (the prefix's stages), "per_sample" (Easy/Hard x Better/Stable/Worse
    of HSFT and the control), "arms" (rows compared with the DPO model they start from, and with HSFT),
    "picked" (a row chosen from another table's rows by validation Dice)."""

    key: str
    title: str
    kind: str
    arms: tuple[Arm, ...] = ()
    x_label: str | None = None  # grid tables: the varied setting (a plot is drawn)
    log_x: bool = False
    note: str = ""
    picks_from: str | None = None  # kind "picked": the table whose rows it chooses among


@dataclass(frozen=True)
class Suite:
    name: str
    tables: tuple[Table, ...]

    def arms(self) -> list[Arm]:
        """Every arm that needs a run of its own, once each (tables may share one), each row's control right
        after the row (it may read the row's hard set)."""
        seen: dict[str, Arm] = {}
        for table in self.tables:
            for arm in (a for row in table.arms for a in (row, row.control) if a is not None):
                if arm.same_as is None:
                    if arm.name in seen and seen[arm.name] != arm:
                        raise ValueError(f"suite {self.name}: two different arms named {arm.name!r}")
                    seen[arm.name] = arm
        return list(seen.values())

    def table(self, key: str) -> Table:
        return next(t for t in self.tables if t.key == key)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _tau_arms(cfg: RunConfig, taus) -> tuple[Arm, ...]:
    return tuple((Arm(f"tau-{tau:.2f}", f"tau = {tau:.2f}", same_as="hsft", value=tau)
                  if _close(tau, cfg.mining.tau) and cfg.mining.hard_quantile is None else
                  Arm(f"tau-{tau:.2f}", f"tau = {tau:.2f}", overrides=(("mining.tau", tau),
                                                                       ("mining.hard_quantile", None)),
                      remine=True, value=tau)).with_control()
                 for tau in taus)


def _epoch_arms(cfg: RunConfig, epochs) -> tuple[Arm, ...]:
    return tuple(Arm(f"epochs-{e}", f"{e} epoch{'s' if e > 1 else ''}", value=e, train_dice=True,
                     **({"same_as": "hsft"} if e == cfg.hsft.train.epochs else
                        {"overrides": (("hsft.train.epochs", e),)}))
                 for e in epochs)


def lr_grid(cfg: RunConfig) -> tuple[float, tuple[float, ...]]:
    """(scale, grid): the published grid times the run's HSFT lr over the published one."""
    scale = cfg.hsft.train.lr / PUBLISHED_HSFT_LR
    return scale, tuple(lr * scale for lr in PAPER_LR_GRID)


def _lr_arms(cfg: RunConfig, grid) -> tuple[Arm, ...]:
    floor_ratio = cfg.hsft.train.min_lr / cfg.hsft.train.lr  # keep the schedule's shape: floor / peak
    return tuple(Arm(f"lr-{lr:.0e}", f"lr = {lr:.0e}", value=lr,
                     **({"same_as": "hsft"} if _close(lr, cfg.hsft.train.lr) else
                        {"overrides": (("hsft.train.lr", lr), ("hsft.train.min_lr", lr * floor_ratio))}))
                 for lr in grid)


def _fraction_arms(cfg: RunConfig, fractions, k: int) -> tuple[Arm, ...]:
    arms = [Arm(f"hardest-{k}", f"the {k} hardest", overrides=(("hsft.max_hard", k),))]
    for fraction in fractions:
        if _close(fraction, 1.0) and cfg.hsft.max_hard is None and _close(cfg.hsft.hard_fraction, 1.0):
            arms.append(Arm("fraction-1.00", "the whole hard set", same_as="hsft", value=1.0))
        else:
            arms.append(Arm(f"fraction-{fraction:.2f}", f"hardest {fraction:.0%} of the hard set",
                            overrides=(("hsft.hard_fraction", fraction),), value=fraction))
    return tuple(arm.with_control() for arm in arms)


ALTERNATIVES = (
    Arm("all_data", "full fine-tuning, all training data", stage="all_data"),
    Arm("control", "uniform random subset of the hard set's size", same_as="control"),
    Arm("curriculum", "easy-to-hard curriculum over all data", stage="curriculum"),
    Arm("anti_curriculum", "hard-to-easy (anti-)curriculum over all data", stage="anti_curriculum"),
    Arm("loss_weighted", "loss-weighted sampling over all data", stage="loss_weighted"),
    Arm("easy_control", "easy-only control: random easy samples, disjoint from the hard set", stage="easy_control"),
    Arm("unet", "U-Net reference (MONAI UNet from scratch on the training split, no VLM)", stage="unet",
        evaluated_by_stage=True),
    Arm("hsft", "HSFT (the hard set)", same_as="hsft"),
)


def _beyond(cfg: RunConfig, rounds: int) -> Table:
    per_round = max(1, math.ceil(cfg.hsft.train.epochs / rounds))
    return Table("5.3", "Beyond the paper: iterative HSFT, adaptive tau, the unified training path", "arms", arms=(
        Arm("iterative", f"iterative HSFT, {rounds} rounds x {per_round} epochs", stage="iterative",
            overrides=(("hsft.rounds", rounds), ("hsft.train.epochs", per_round))),
        Arm(f"quantile-{QUANTILE:.2f}", f"adaptive tau: the hardest {QUANTILE:.0%} of the training split",
            overrides=(("mining.hard_quantile", QUANTILE),), remine=True).with_control(),
        Arm("unified", "unified path: [SEG] state from the generate path", overrides=(("hsft.seg_form", "generate"),)),
        Arm("hsft", "HSFT (teacher-forced [SEG] state, tau fixed, one round)", same_as="hsft"),
    ), note="Iterative HSFT re-mines before every round (its steps are not matched: see the steps column); "
            "adaptive tau here is a quantile rule; the tau picked on the validation split is the next table.")


def paper_suite(cfg: RunConfig) -> Suite:
    scale, grid = lr_grid(cfg)
    grid_note = ("the published grid" if _close(scale, 1.0) else
                 f"the published grid x {scale:g} (this run's HSFT lr {cfg.hsft.train.lr:g} over the published 1e-5)")
    tau_table = Table("4.5.2", "tau: the hard-set threshold", "arms", arms=_tau_arms(cfg, PAPER_TAUS), x_label="tau")
    return Suite("paper", (
        Table("4.4.1", "Per stage", "stages"),
        Table("4.4.2", "Amount of hard data: the k hardest, fractions of the hard set, the whole hard set", "arms",
              arms=_fraction_arms(cfg, PAPER_FRACTIONS, HARDEST_K), x_label="fraction of the hard set"),
        Table("4.4.3", "Per sample: Easy/Hard x Better/Stable/Worse, HSFT and the random-subset control", "per_sample"),
        tau_table,
        Table("4.5.3", "Epochs", "arms", arms=_epoch_arms(cfg, PAPER_EPOCHS), x_label="epochs"),
        Table("4.5.4", f"Learning rate ({grid_note})", "arms", arms=_lr_arms(cfg, grid), x_label="learning rate",
              log_x=True),
        Table("5.1", "Alternatives at matched compute (same steps, trainable parts and schedule)", "arms",
              arms=ALTERNATIVES),
        _beyond(cfg, ROUNDS),
        Table("5.3-tau", "Adaptive tau picked on the validation split", "picked", picks_from="4.5.2"),
    ))


# CI-sized: one grid, one variant stage, the per-stage and per-sample tables, on a shrunken run (these
# settings are written over the command line's).
SMOKE_SETTINGS = (
    ("base.train.epochs", 4), ("base.pool_size", 16), ("base.encoder_pool_size", 16), ("data.synthetic_train", 12),
    ("data.synthetic_test", 6), ("data.synthetic_size", 64), ("lora.train.epochs", 1), ("lora.rank", 4),
    ("dpo.train.epochs", 1),
    ("hsft.train.epochs", 1), ("eval.overlays", 0), ("eval.fixed_overlays", 0), ("eval.bootstrap_resamples", 500),
    ("unet.max_epochs", 3), ("unet.patience", 2), ("precision", "fp32"),
)


def smoke_suite(cfg: RunConfig) -> Suite:
    return Suite("smoke", (
        Table("4.4.1", "Per stage", "stages"),
        Table("4.4.3", "Per sample: Easy/Hard x Better/Stable/Worse, HSFT and the random-subset control", "per_sample"),
        Table("4.5.2", "tau: the hard-set threshold", "arms", arms=_tau_arms(cfg, (0.70, cfg.mining.tau)),
              x_label="tau"),
        Table("5.1", "Alternatives at matched compute", "arms", arms=tuple(
            a for a in ALTERNATIVES if a.name in ("curriculum", "control", "easy_control", "unet", "hsft"))),
        Table("5.3-tau", "Adaptive tau picked on the validation split", "picked", picks_from="4.5.2"),
    ))


def core_suite(cfg: RunConfig) -> Suite:
    """The verdicts that matter most, at a fraction of the paper suite's cost: the per-stage table, the per-sample
    table, tau 0.60 (the smaller, harder set) and the recipe's tau each against its own random subset, and the
    matched-compute controls with the U-Net reference."""
    return Suite("core", (
        Table("4.4.1", "Per stage", "stages"),
        Table("4.4.3", "Per sample: Easy/Hard x Better/Stable/Worse, HSFT and the random-subset control", "per_sample"),
        Table("4.5.2", "tau: the hard-set threshold, each against its own random subset", "arms",
              arms=_tau_arms(cfg, (0.60, cfg.mining.tau)), x_label="tau"),
        Table("5.1", "Controls at matched compute, and the U-Net reference", "arms", arms=tuple(
            a for a in ALTERNATIVES if a.name in ("control", "easy_control", "unet", "hsft"))),
    ))


SUITES = {"paper": (paper_suite, ()), "core": (core_suite, ()), "smoke": (smoke_suite, SMOKE_SETTINGS)}
# The untouched test split the study reports on, for the generated synthetic data (a dataset read from files
# reports on its official test split). The smoke suite's is small: it checks the plumbing.
UNTOUCHED_IMAGES = {"paper": 256, "core": 256, "smoke": 8}


def build_suite(name: str, cfg: RunConfig) -> tuple[Suite, RunConfig]:
    """The suite and the run config its runs use (the suite's own settings written over `cfg`)."""
    if name not in SUITES:
        raise BadValue(f"--suite: unknown suite {name!r}; valid suites are {', '.join(SUITES)}")
    build, settings = SUITES[name]
    cfg = replace_nested(cfg, **dict(settings))
    if cfg.data.format == "synthetic" and cfg.data.root is None and cfg.data.synthetic_untouched == 0:
        cfg = replace_nested(cfg, **{"data.synthetic_untouched": UNTOUCHED_IMAGES[name]})
    return build(cfg), cfg
