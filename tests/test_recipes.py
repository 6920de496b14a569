"""Named recipes: which one a run starts from, and that explicit options override it."""

from __future__ import annotations

import argparse

import pytest

from hsft.arguments import add_config_arguments
from hsft.config import LoraStageConfig, RunConfig, replace_nested
from hsft.recipes import RECIPES, config_from_arguments, recipe_config


def parse(argv) -> RunConfig:
    parser = argparse.ArgumentParser()
    dests = add_config_arguments(parser, RunConfig)
    return config_from_arguments(parser.parse_args(argv), dests)


def test_the_embedded_default_starts_from_tiny_and_a_real_checkpoint_from_paper():
    tiny = parse([])
    assert tiny.recipe == "tiny"
    assert tiny.lora.train.lr == RECIPES["tiny"]["lora.train.lr"] and tiny.dpo.normalisation == "disagree"
    assert tiny.hsft.train.lr == RECIPES["tiny"]["hsft.train.lr"] and tiny.lora.mask_loss_weight == 1.0
    # The tiny recipe's LoRA stage also trains the mask decoder (as Sa2VA's own fine-tuning does).
    assert tiny.lora.train_mask_decoder is True
    paper = parse(["--model", "some/dir"])
    assert paper.recipe == "paper"
    # The published settings: LoRA with the cross-entropy loss alone, DPO lr 1e-6, HSFT lr 1e-5.
    assert paper.lora.mask_loss_weight == 0.0 and paper.lora.rank == 64 and paper.lora.train.lr == 2e-4
    assert paper.lora.train_mask_decoder is False and paper.lora.train.epochs == 3
    assert paper.dpo.train.lr == 1e-6 and paper.dpo.normalisation == "mean" and paper.hsft.train.lr == 1e-5
    assert parse(["--model-vlm", "v", "--model-sam2", "s"]).recipe == "paper"


def test_explicit_options_override_the_recipe():
    cfg = parse(["--recipe", "tiny", "--hsft-lr", "3e-3", "--lora-mask-loss-weight", "0"])
    assert cfg.hsft.train.lr == 3e-3 and cfg.lora.mask_loss_weight == 0.0
    assert cfg.dpo.train.lr == RECIPES["tiny"]["dpo.train.lr"]  # the rest of the recipe stays
    assert parse(["--recipe", "paper"]).hsft.train.lr == 1e-5


def test_paper_is_the_dataclass_defaults_and_a_bad_name_is_named():
    assert recipe_config("paper") == RunConfig(recipe="paper")
    assert LoraStageConfig().mask_loss_weight == 0.0
    with pytest.raises(ValueError, match="recipe: unknown recipe 'huge'"):
        recipe_config("huge")
    with pytest.raises(ValueError, match="recipe: must be 'paper' or 'tiny'"):
        parse(["--recipe", "huge"]).validate()


def test_a_recipe_takes_the_keys_set_takes():
    from hsft.config import with_settings

    for name, values in RECIPES.items():  # the recipes' own keys are fields' dotted paths
        assert recipe_config(name) == replace_nested(RunConfig(), recipe=name, **values)
    cfg = with_settings(RunConfig(), {"hsft.lr": 2e-3, "train.clip": 0.5, "inference.batch_size": 4,
                                      "base.referring": True})
    assert cfg.hsft.train.lr == 2e-3 and cfg.base.referring is True
    assert {cfg.base.train.clip, cfg.lora.train.clip, cfg.dpo.train.clip, cfg.hsft.train.clip} == {0.5}
    assert cfg.mining.batch_size == cfg.eval.batch_size == 4
    with pytest.raises(ValueError, match=r"^setting hsft\.lrr: unknown key 'hsft\.lrr'; did you mean "
                                         r"hsft\.train\.lr\?"):
        with_settings(RunConfig(), {"hsft.lrr": 1.0})
