"""Named hyper-parameter recipes: `paper` (the published settings, the RunConfig defaults) and `tiny`
(for the embedded 0.4 M-parameter default model, whose stages barely move at learning rates set for a
4 B model).

A recipe names fields by the keys `--set` takes (hsft.config.with_settings). The recipe is the starting
point; every option given on the command line overrides it. Without
--recipe, the embedded default uses `tiny`, a real checkpoint (--vlm/--sam2, or a --model imported from a
release) `paper`, and a --model the pipeline trained continues with the recipe and precision its
directory records (hsft.model.directory).
BENCHMARKS.md ("Recipe search") shows the validation-split numbers the tiny values were chosen on.
"""

from __future__ import annotations

from hsft.config import RunConfig, replace_nested, with_settings
from hsft.model.directory import read_training_record

__all__ = ["RECIPES", "recipe_config", "default_recipe", "config_from_arguments"]

RECIPES: dict[str, dict[str, object]] = {
    # Published: LoRA r 64 / alpha 16 / lr 2e-4 with the cross-entropy loss alone, DPO lr 1e-6 beta 0.1,
    # HSFT lr 1e-5 (the dataclass defaults).
    "paper": {},
    "tiny": {
        # r 64 exceeds the tiny LLM's width (64); the mask loss gives text_hidden_fcs a gradient.
        # The mask decoder trains with the adapters, as in Sa2VA's own fine-tuning, so LoRA reaches the masks.
        "lora.rank": 8, "lora.alpha": 16.0, "lora.mask_loss_weight": 1.0, "lora.train_mask_decoder": True,
        # Learning rates and LoRA's epochs: chosen on the validation split (hsft.recipe_search, BENCHMARKS.md "Recipe search").
        "lora.train.lr": 3e-3, "lora.train.min_lr": 1e-5, "lora.train.epochs": 3,
        # Disputed-pixel normalisation: the DPO logit no longer shrinks with the fraction of wrong pixels.
        "dpo.normalisation": "disagree", "dpo.train.lr": 1e-4, "dpo.train.epochs": 2,
        "hsft.train.lr": 1e-3, "hsft.train.min_lr": 1e-6,
    },
}


def default_recipe(cfg: RunConfig) -> str:
    if cfg.start_model:
        record = read_training_record(cfg.start_model)
        if record and record.get("recipe") in RECIPES:
            return record["recipe"]
    return "tiny" if cfg.embedded_default else "paper"


def recorded_precision(cfg: RunConfig) -> str | None:
    """The precision a --model directory was trained in, which the run keeps unless --precision says otherwise."""
    record = read_training_record(cfg.start_model) if cfg.start_model else None
    return record.get("precision") if record else None


def recipe_config(name: str, base: RunConfig | None = None) -> RunConfig:
    """`base` (default: RunConfig()) with the recipe's values written in, and its name recorded."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; valid recipes are {', '.join(RECIPES)}")
    return with_settings(replace_nested(base or RunConfig(), recipe=name), RECIPES[name])


def config_from_arguments(namespace, dests) -> RunConfig:
    """The run's config from parsed command-line options (hsft.arguments): the recipe's values first,
    then every option the user gave written over them."""
    from hsft.arguments import apply_arguments

    given = apply_arguments(RunConfig(), namespace, dests)
    name = given.recipe or default_recipe(given)
    if name not in RECIPES:
        return given  # RunConfig.validate() names the bad value in one line
    cfg = apply_arguments(recipe_config(name), namespace, dests)
    if cfg.precision is None and recorded_precision(cfg):
        cfg = replace_nested(cfg, precision=recorded_precision(cfg))
    return cfg
