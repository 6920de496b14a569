"""Typed configuration for every stage of the pipeline.

Defaults are the method's published settings where it publishes them (marked "published"). Stage 0
(`BaseStageConfig`) exists for the embedded default only and has its own settings.

Each dataclass validates itself (`validate()` raises ValueError naming the offending field), so a
bad value is found when the command starts, never hours into training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hsft.data.config import DataConfig
from hsft.arguments import Shared
from hsft.engine.config import PRECISIONS, STAGE_TRAIN_FIELDS, TrainConfig
from hsft.errors import BadValue, check as _check
from hsft.eval.config import DEFAULT_TAU, EvalConfig
from hsft.model.config import ModelConfig, PromptConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "PromptConfig",
    "TrainConfig",
    "BaseStageConfig",
    "LoraStageConfig",
    "DPOStageConfig",
    "MiningConfig",
    "HSFTStageConfig",
    "UNetStageConfig",
    "EvalConfig",
    "RunConfig",
    "STAGE_ORDER",
    "DEFAULT_STAGES",
    "PRECISIONS",
    "SHARED_SETTINGS",
    "MAIN_OPTIONS",
    "OPTION_GROUPS",
    "with_settings",
]

# The order the pipeline runs stages in. "base" (stage 0) only exists for the embedded default
# model: it stands in for the published pre-trained checkpoint. "control" is HSFT's matched-compute
# control: HSFT's settings on a random training subset of the hard set's size, from the model HSFT
# started from.
STAGE_ORDER = ("base", "lora", "dpo", "mining", "hsft", "control", "all_data", "curriculum", "anti_curriculum",
               "loss_weighted", "iterative", "easy_control", "unet", "eval")
# What the main command runs unless --stages says otherwise. The other variants beside HSFT (full
# fine-tuning, the curricula, loss-weighted sampling, iterative HSFT) train at HSFT's compute from the
# model HSFT starts from; launch/experiments.py runs them, and --stages selects them by name.
DEFAULT_STAGES = ("base", "lora", "dpo", "mining", "hsft", "control", "eval")


@dataclass
class BaseStageConfig:
    """Stage 0: pre-train the embedded tiny model on a synthetic pool (stand-in for a real checkpoint)."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=8, micro_batch=8, grad_accum=1, lr=3e-3, min_lr=3e-5, warmup_ratio=0.05, weight_decay=0.01
        )
    )
    pool_size: int = field(default=96, metadata={"help": "synthetic images in the pre-training pool"})
    source: str = field(
        default="other-style",
        metadata={"help": "pre-training domain: 'other-style' (desaturated, clean images: not the target domain) or "
                          "'target' (the target distribution itself)"},
    )
    referring: bool = field(
        default=False,
        metadata={"help": "ask three questions of every pool image (vessels, optic disc, field of view, each worded "
                          "unlike the target's question), so the mask decoder must read the [SEG] state; false: "
                          "the target's question alone"},
    )
    encoder_pool_size: int = field(
        default=96,
        metadata={"help": "first pre-train the SAM2 image encoder and mask decoder alone (mask loss) on this many "
                          "images of every colour style and the target's difficulty range, a stand-in for SAM2's "
                          "own broad pre-training; the Sa2VA part then trains on the source pool with that "
                          "encoder frozen, as Sa2VA does (0: one phase, every module on the source pool)"},
    )
    source_mask_dilation: int = field(
        default=1,
        metadata={"help": "pixels by which the source pool's vessel masks are dilated: a coarser annotation "
                          "protocol than the target's (0: the same protocol)"},
    )
    mask_loss_weight: float = field(default=1.0, metadata={"help": "weight of Dice+BCE next to the LM loss"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "where the pre-trained base is cached (default: $HSFT_CACHE or ~/.cache/hsft)"}
    )
    precision: str | None = field(
        default="fp32",
        metadata={"help": f"precision of this stand-in pre-training, one of {', '.join(PRECISIONS)} (none: the "
                          "run's); fp32 because bf16 is 3-4x slower on CPUs and the stage is not part of the method",
                  "brief": f"stage 0's precision, one of {', '.join(PRECISIONS)} (none: the run's)"},
    )

    def validate(self) -> None:
        self.train.validate("base")
        if self.precision is not None:
            _check(self.precision in PRECISIONS, "base.precision",
                   f"must be one of {', '.join(PRECISIONS)} or none, got {self.precision!r}")
        _check(self.pool_size >= 8, "base.pool_size", f"must be >= 8, got {self.pool_size}")
        _check(self.source in ("other-style", "target"), "base.source",
               f"must be 'other-style' or 'target', got {self.source!r}")
        _check(self.mask_loss_weight >= 0, "base.mask_loss_weight", "must be >= 0")
        _check(self.encoder_pool_size == 0 or self.encoder_pool_size >= 8, "base.encoder_pool_size",
               f"must be 0 (off) or >= 8, got {self.encoder_pool_size}")
        _check(0 <= self.source_mask_dilation <= 8, "base.source_mask_dilation",
               f"must lie in [0, 8], got {self.source_mask_dilation}")


@dataclass
class LoraStageConfig:
    """Stage 1: LoRA on the LLM's attention projections (published: r 64, alpha 16, lr 2e-4, mb 8, 3 epochs)."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, micro_batch=8, grad_accum=1, lr=2e-4, min_lr=0.0,
                                            warmup_ratio=0.03, weight_decay=0.01)
    )
    rank: int = field(default=64, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    mask_loss_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the Dice+BCE mask loss next to the CE loss (published: CE only, 0; with 0 "
                          "text_hidden_fcs gets no gradient and stays frozen)",
                  "brief": "weight of the Dice+BCE mask loss next to the CE loss"},
    )

    train_mask_decoder: bool = field(
        default=False,
        metadata={"help": "also train the SAM2 mask decoder with its prompt encoder (not conv_s0/conv_s1) on the mask "
                          "loss, as Sa2VA's own fine-tuning does (published recipe: off, CE alone; needs "
                          "--lora-mask-loss-weight > 0)",
                  "brief": "also train the SAM2 mask decoder on the mask loss (needs a mask loss weight > 0)"},
    )
    seg_rows: bool | None = field(
        default=None,
        metadata={"help": "also train the [SEG] rows of the input embedding and the LM head, as Sa2VA does "
                          "(default: on when starting from a real checkpoint, off for the embedded default)",
                  "brief": "also train the [SEG] rows of the embedding and LM head (none: on for a real checkpoint)"},
    )

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute each LLM layer's activations in the backward pass instead of keeping them "
                          "(the same gradients; at Sa2VA-1B a 10-tile image keeps about 14 GB of activations "
                          "without it; default: on when starting from a real checkpoint, off for the embedded "
                          "default)",
                  "brief": "recompute the LLM's activations in backward (none: on for a real checkpoint)"},
    )

    def validate(self) -> None:
        self.train.validate("lora")
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must lie in [0, 1), got {self.dropout}")
        _check(self.mask_loss_weight >= 0, "lora.mask_loss_weight", "must be >= 0")
        _check(not self.train_mask_decoder or self.mask_loss_weight > 0, "lora.train_mask_decoder",
               "the mask decoder only gets a gradient from the mask loss: set --lora-mask-loss-weight > 0")


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DPO_NORMALISATIONS = ("mean", "sum", "disagree")


@dataclass
class DPOStageConfig:
    """Stage 2: DPO on masks, ground truth preferred over the model's own prediction (published: lr 1e-6,
    micro-batch 1, accumulation 4, 1 epoch)."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=1, micro_batch=1, grad_accum=4, lr=1e-6, min_lr=0.0,
                                            weight_decay=0.01)
    )
    beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature (docs/method.md explains its scale)"})
    loss: str = field(default="sigmoid", metadata={"help": f"one of {', '.join(DPO_LOSSES)}"})
    normalisation: str = field(
        default="mean", metadata={"help": f"mask log-likelihood normalisation: {', '.join(DPO_NORMALISATIONS)}"}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "robust DPO: assumed label-noise rate"})
    pair_threshold: float = field(default=0.9, metadata={"help": "keep a pair only when the prediction's Dice < this"})
    margin_weight: float = field(default=0.0, metadata={"help": "weight of the (1 - Dice) target-margin term"})

    def validate(self) -> None:
        self.train.validate("dpo")
        _check(self.beta > 0, "dpo.beta", f"must be > 0, got {self.beta}")
        _check(self.loss in DPO_LOSSES, "dpo.loss", f"must be one of {DPO_LOSSES}, got {self.loss!r}")
        _check(self.normalisation in DPO_NORMALISATIONS, "dpo.normalisation",
               f"must be one of {DPO_NORMALISATIONS}, got {self.normalisation!r}")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must lie in [0, 0.5)")
        _check(self.label_smoothing == 0 or self.loss == "robust", "dpo.label_smoothing",
               f"only the 'robust' loss uses label smoothing; got loss {self.loss!r}")
        _check(0 < self.pair_threshold <= 1, "dpo.pair_threshold", "must lie in (0, 1]")
        _check(self.margin_weight >= 0, "dpo.margin_weight", "must be >= 0")


# Published difficulty buckets of per-sample Dice, hardest first: (upper bound, label).
DICE_BUCKETS = ((0.30, "very hard"), (0.50, "hard"), (0.65, "moderate"), (0.75, "borderline"), (math.inf, "easy"))


@dataclass
class MiningConfig:
    """Hard-sample mining: run the inference path over the training split, keep Dice < tau."""

    tau: float = field(default=DEFAULT_TAU, metadata={"help": "Dice threshold below which a training sample is hard"})
    hard_quantile: float | None = field(
        default=None, metadata={"help": "instead of tau, keep the hardest fraction q of the training split"}
    )
    batch_size: int = field(default=8, metadata={"help": "samples per generate call"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget per sample"})

    def validate(self) -> None:
        _check(0 < self.tau <= 1, "mining.tau", f"must lie in (0, 1], got {self.tau}")
        if self.hard_quantile is not None:
            _check(0 < self.hard_quantile <= 1, "mining.hard_quantile", f"must lie in (0, 1], got {self.hard_quantile}")
        _check(self.batch_size >= 1, "mining.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "mining.max_new_tokens", "must be >= 1")


# Where the [SEG] hidden state that fine-tuning trains on comes from: the teacher-forced input with [SEG]
# in the response (as generated) or in the prompt, or the generate path itself ("generate": the state
# inference uses, so training and inference see the same prompt; needs the feature cache).
SEG_FORMS = ("response", "prompt", "generate")


@dataclass
class HSFTStageConfig:
    """Stage 3: fine-tune text_hidden_fcs + the SAM2 mask decoder on the hard set with Dice + 0.5 BCE
    (published: lr 1e-5, mb 1, accumulation 2, 5 epochs, wd 0.01, cosine to 1e-7, clip 1.0). The
    matched-compute control stage ("control") trains with these same settings."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=5, micro_batch=1, grad_accum=2, lr=1e-5, min_lr=1e-7,
                                            weight_decay=0.01, clip=1.0)
    )
    bce_weight: float = field(default=0.5, metadata={"help": "weight of BCE next to Dice"})
    dice_eps: float = field(default=1e-8, metadata={"help": "Dice smoothing epsilon"})
    seg_form: str = field(
        default="response",
        metadata={"help": "where HSFT takes the [SEG] state: 'response' (teacher-forced answer), 'prompt' ([SEG] "
                          "appended to the prompt) or 'generate' (the generate path; needs the feature cache)",
                  "brief": "where HSFT takes the [SEG] state: response, prompt or generate"},
    )
    cache_features: bool = field(
        default=True, metadata={"help": "compute the frozen SAM2 features and [SEG] states once and reuse them"}
    )
    train_feature_convs: bool = field(
        default=False,
        metadata={"help": "also train the mask decoder's conv_s0/conv_s1 (they compute the cached image features, "
                          "so this needs --hsft-cache-features false)"},
    )
    cache_on_device: bool = field(
        default=False,
        metadata={"help": "keep the feature cache in accelerator memory (default: pinned host memory, copied per "
                          "micro-batch)",
                  "brief": "keep the feature cache in accelerator memory (off: pinned host memory)"},
    )
    cuda_graph: bool = field(
        default=False,
        metadata={"help": "replay the cached step's decoder (text_hidden_fcs -> SAM2 mask decoder) forward and "
                          "backward as CUDA graphs, captured once per micro-batch shape (needs a CUDA device and "
                          "the feature cache; the decoder's IoU and object-score heads and unused prompt "
                          "embeddings, which the loss never reaches, are then frozen)",
                  "brief": "replay the cached step's decoder as CUDA graphs (CUDA and the feature cache)"},
    )
    max_hard: int | None = field(
        default=None, metadata={"help": "train on the k hardest samples of the hard set only (none: all of it)"}
    )
    hard_fraction: float = field(
        default=1.0, metadata={"help": "train on the hardest fraction of the hard set (1: all of it)"}
    )
    rounds: int = field(
        default=3, metadata={"help": "iterative HSFT (stage 'iterative'): rounds of mining then fine-tuning, each "
                                     "round with these settings",
                             "brief": "rounds of mining then fine-tuning of the 'iterative' stage"}
    )

    def validate(self) -> None:
        self.train.validate("hsft")
        _check(self.bce_weight >= 0, "hsft.bce_weight", "must be >= 0")
        _check(self.dice_eps > 0, "hsft.dice_eps", "must be > 0")
        _check(self.seg_form in SEG_FORMS, "hsft.seg_form", f"must be one of {SEG_FORMS}, got {self.seg_form!r}")
        _check(not (self.train_feature_convs and self.cache_features), "hsft.train_feature_convs",
               "conv_s0/conv_s1 compute the cached image features: pass --hsft-cache-features false to train them")
        _check(self.seg_form != "generate" or self.cache_features, "hsft.seg_form",
               "'generate' takes the [SEG] state from one generate pass per sample, which needs the feature cache "
               "(--hsft-cache-features true)")
        _check(not self.cuda_graph or self.cache_features, "hsft.cuda_graph",
               "replays the cached step's decoder, which needs the feature cache (--hsft-cache-features true)")
        if self.max_hard is not None:
            _check(self.max_hard >= 1, "hsft.max_hard", f"must be >= 1, got {self.max_hard}")
        _check(0 < self.hard_fraction <= 1, "hsft.hard_fraction", f"must lie in (0, 1], got {self.hard_fraction}")
        _check(self.rounds >= 1, "hsft.rounds", f"must be >= 1, got {self.rounds}")

    def limit(self, hard: list) -> list:
        """The part of the hard set (hardest first) this stage trains on: `hard_fraction` of it, at most
        `max_hard` samples, at least one."""
        keep = max(1, math.ceil(self.hard_fraction * len(hard))) if hard else 0
        if self.max_hard is not None:
            keep = min(keep, self.max_hard)
        return hard[:keep]


@dataclass
class UNetStageConfig:
    """The U-Net reference row (hsft.stages.unet): a MONAI UNet trained from scratch on the training split
    until the validation Dice stops improving."""

    base_channels: int = field(default=16, metadata={"help": "U-Net channels at full resolution (doubled a level)"})
    levels: int = field(default=4, metadata={"help": "U-Net resolution levels (stride 2 between them)"})
    res_units: int = field(default=2, metadata={"help": "residual units per U-Net level"})
    lr: float = field(default=3e-3, metadata={"help": "U-Net AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "U-Net images per step"})
    max_epochs: int = field(default=200, metadata={"help": "U-Net epochs at most"})
    patience: int = field(default=10, metadata={"help": "stop after this many epochs without a better validation Dice"})
    min_improvement: float = field(default=0.005, metadata={
        "help": "a validation Dice counts as better when it beats the best so far by more than this"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips while training the U-Net"})

    def validate(self) -> None:
        for name in ("base_channels", "res_units", "batch_size", "max_epochs", "patience"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= (0 if name == "res_units" else 1), f"unet.{name}",
                   f"must be a positive integer, got {value!r}")
        _check(isinstance(self.levels, int) and 2 <= self.levels <= 6, "unet.levels",
               f"must lie in [2, 6], got {self.levels!r}")
        _check(self.lr > 0, "unet.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_improvement < 1, "unet.min_improvement", f"must lie in [0, 1), got {self.min_improvement}")


@dataclass
class RunConfig:
    """Everything one invocation of the main command needs."""

    output_dir: str = field(default="runs/hsft", metadata={"help": "every stage writes below this directory"})
    deepspeed: str = field(default="ds_configs/zero2.json", metadata={"help": "DeepSpeed JSON config"})
    stages: tuple[str, ...] = DEFAULT_STAGES
    seed: int = field(default=0, metadata={"help": "seeds the model init, the data order and the control subset "
                                                    "(the validation split follows --data-seed)",
                                           "brief": "seeds the model init, the data order and the control subset"})
    precision: str | None = field(
        default=None, metadata={"help": f"training and inference precision, one of {', '.join(PRECISIONS)} "
                                        "(none: the DeepSpeed config's)"})
    recipe: str | None = field(
        default=None,
        metadata={"help": "hyper-parameter recipe: 'paper' (the published settings) or 'tiny' (for the embedded model); "
                          "options given explicitly override it (default: tiny for the embedded default, paper "
                          "for a real checkpoint)",
                  "brief": "hyper-parameter recipe: paper or tiny (none: tiny for the embedded default, else paper)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest complete checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the selected stages' earlier output"})
    verbose: bool = field(default=False, metadata={"help": "show DeepSpeed's and transformers' informational logs"})
    standalone: bool = field(
        default=False,
        metadata={"help": "write every stage's model directory self-contained; by default a stage stores only the "
                          "tensors it changed and refers to its input model's directory",
                  "brief": "write self-contained model directories (default: only the tensors a stage changed)"},
    )
    keep_checkpoints: int = field(
        default=1, metadata={"help": "complete DeepSpeed checkpoints kept per stage (the newest; --resume needs one)"}
    )
    start_model: str | None = field(
        default=None, metadata={"flag": "--model", "help": "a saved model directory (e.g. a stage's model/) that "
                                                           "the first selected stage starts from"}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseStageConfig = field(default_factory=BaseStageConfig)
    lora: LoraStageConfig = field(default_factory=LoraStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    hsft: HSFTStageConfig = field(default_factory=HSFTStageConfig)
    unet: UNetStageConfig = field(default_factory=UNetStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def eval_settings(self) -> EvalConfig:
        """The evaluation settings with `eval.tau` following `mining.tau` unless it was set."""
        return self.eval.following(self.mining)

    @property
    def embedded_default(self) -> bool:
        """True when no real checkpoint was given: the pipeline builds and pre-trains the tiny preset."""
        return self.model.vlm is None and self.start_model is None

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        _check(not unknown, "stages", f"unknown stage(s) {unknown}; valid stages are {', '.join(STAGE_ORDER)}")
        _check(len(self.stages) > 0, "stages", "select at least one stage")
        positions = [STAGE_ORDER.index(s) for s in self.stages]
        # Any ordered selection works (each stage reads the newest model before it), which allows
        # ablations such as base,mining,hsft,eval (HSFT without LoRA and DPO).
        _check(positions == sorted(set(positions)), "stages",
               f"must follow the pipeline order {','.join(STAGE_ORDER)} without repeats, got {','.join(self.stages)}")
        if "base" in self.stages:
            _check(self.embedded_default, "stages",
                   "'base' pre-trains the embedded tiny model; drop it when --model or --vlm is given")
        if self.precision is not None:
            _check(self.precision in PRECISIONS, "precision",
                   f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.recipe in (None, "paper", "tiny"), "recipe", f"must be 'paper' or 'tiny', got {self.recipe!r}")
        self.model.validate()
        self.data.validate()
        for stage_cfg in (self.base, self.lora, self.dpo, self.mining, self.hsft, self.unet, self.eval):
            stage_cfg.validate()


# The stages with a training loop of their own (the variants beside HSFT and the control take HSFT's).
TRAINING_STAGES = ("base", "lora", "dpo", "hsft")

# Settings that are one value across the run: each writes the same value into several fields (the fields
# keep their own values, as recipes set them, unless the setting is given). --set reaches them as
# `train.<field>` / `inference.<field>`.
SHARED_SETTINGS = tuple(
    Shared(f"train.{f.name}", tuple(f"{stage}.train.{f.name}" for stage in TRAINING_STAGES),
           f.metadata.get("help", "") + ", in every training stage")
    for f in dataclasses.fields(TrainConfig) if f.name not in STAGE_TRAIN_FIELDS and f.name != "betas"
) + (
    Shared("inference.batch_size", ("mining.batch_size", "eval.batch_size"),
           "samples per generate call in mining, DPO pairs, validation and evaluation"),
    Shared("inference.max_new_tokens", ("mining.max_new_tokens", "eval.max_new_tokens"),
           "generation budget per sample in mining, DPO pairs, validation and evaluation"),
)

# The main command's options, by group in this order. Every other field (and shared setting) is set with
# --set KEY=VALUE; `launch/hsft.py --help-all` lists them. docs/usage.md says why each one is where it is.
MAIN_OPTIONS = (
    "output_dir", "deepspeed", "start_model", "seed", "precision", "recipe", "resume", "overwrite", "verbose",
    "standalone", "keep_checkpoints",
    "model.preset", "model.vlm", "model.sam2",
    "data.format", "data.root", "data.val_fraction", "data.seed", "data.synthetic_train", "data.synthetic_test",
    "data.synthetic_size",
    "train.warmup_ratio", "train.weight_decay", "train.clip",
    "inference.batch_size", "inference.max_new_tokens",
    "base.train.epochs", "base.pool_size", "base.cache_dir", "base.precision",
    *(f"{stage}.train.{name}" for stage in ("lora",) for name in STAGE_TRAIN_FIELDS),
    "lora.rank", "lora.alpha", "lora.dropout", "lora.mask_loss_weight", "lora.train_mask_decoder", "lora.seg_rows",
    *(f"dpo.train.{name}" for name in STAGE_TRAIN_FIELDS),
    "dpo.beta", "dpo.loss", "dpo.normalisation", "dpo.pair_threshold",
    "mining.tau", "mining.hard_quantile",
    *(f"hsft.train.{name}" for name in STAGE_TRAIN_FIELDS),
    "hsft.bce_weight", "hsft.seg_form", "hsft.cache_features", "hsft.cache_on_device", "hsft.cuda_graph",
    "hsft.max_hard", "hsft.hard_fraction", "hsft.rounds",
    "eval.tau", "eval.evaluate_start",
)

OPTION_GROUPS = {
    "run": "run",
    "model": "model (embedded preset, or local InternVL + SAM2 checkpoints)",
    "data": "data",
    "train": "training, every stage (unless given, each keeps its recipe's value; one stage's: --set hsft.clip=...)",
    "inference": "inference (mining, DPO pairs, validation, evaluation)",
    "base": "stage 0: pre-training of the embedded default",
    "lora": "stage 1: LoRA",
    "dpo": "stage 2: mask DPO",
    "mining": "mining: the hard set",
    "hsft": "stage 3: HSFT (and the variants and control beside it)",
    "eval": "evaluation",
}


def with_settings(cfg: RunConfig, settings: dict[str, object]) -> RunConfig:
    """`cfg` with `settings` written in, keyed as --set takes them (a field's dotted path, a stage's training
    field without its `train` level, or a shared setting such as `train.weight_decay`); an unknown key is a
    ValueError naming the closest one."""
    from hsft.arguments import resolve_key

    changes = {}
    for key, value in settings.items():
        try:
            paths, _ = resolve_key(RunConfig, key, SHARED_SETTINGS)
        except ValueError as error:
            raise BadValue(f"setting {key}: {error}") from None
        changes.update({".".join(path): value for path in paths})
    return replace_nested(cfg, **changes)


def replace_nested(cfg, **changes):
    """dataclasses.replace for dotted names: replace_nested(run, **{"hsft.train.lr": 1e-4})."""
    updates: dict[str, dict] = {}
    direct = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            updates.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in updates.items():
        direct[head] = replace_nested(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **direct)
