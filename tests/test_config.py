"""Config validation: every bad value is refused at start-up with the field's name."""

from __future__ import annotations

import pytest

from hsft.config import (DPOStageConfig, EvalConfig, HSFTStageConfig, LoraStageConfig, MiningConfig, RunConfig,
                         TrainConfig, replace_nested)


def test_defaults_are_valid_and_the_published_settings():
    cfg = RunConfig()
    cfg.validate()
    assert (cfg.hsft.train.lr, cfg.hsft.train.micro_batch, cfg.hsft.train.grad_accum, cfg.hsft.train.epochs) == \
        (1e-5, 1, 2, 5)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.train.lr) == (64, 16.0, 2e-4)
    assert (cfg.dpo.train.lr, cfg.dpo.beta, cfg.mining.tau, cfg.hsft.bce_weight) == (1e-6, 0.1, 0.75, 0.5)


@pytest.mark.parametrize("changes, field", [
    ({"hsft.train.lr": 0.0}, "hsft.lr"),
    ({"hsft.train.min_lr": 1.0}, "hsft.min_lr"),
    ({"lora.train.epochs": 0}, "lora.epochs"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"lora.dropout": 1.0}, "lora.dropout"),
    ({"dpo.beta": -1.0}, "dpo.beta"),
    ({"dpo.loss": "kto"}, "dpo.loss"),
    ({"dpo.label_smoothing": 0.1}, "dpo.label_smoothing"),  # only the robust loss smooths
    ({"mining.tau": 1.5}, "mining.tau"),
    ({"mining.hard_quantile": 0.0}, "mining.hard_quantile"),
    ({"hsft.seg_form": "middle"}, "hsft.seg_form"),
    ({"eval.bootstrap_resamples": 0}, "eval.bootstrap_resamples"),
    ({"precision": "fp8"}, "precision"),
    ({"stages": ("lora", "base")}, "stages"),
    ({"stages": ("mine",)}, "stages"),
    ({"stages": ()}, "stages"),
    ({"start_model": "some/model", "stages": ("base", "lora")}, "stages"),
])
def test_bad_values_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        replace_nested(RunConfig(), **changes).validate()


def test_replace_nested_changes_only_the_named_fields():
    base = RunConfig()
    changed = replace_nested(base, **{"hsft.train.lr": 1e-3, "seed": 4})
    assert changed.hsft.train.lr == 1e-3 and changed.seed == 4
    assert base.hsft.train.lr == 1e-5 and changed.lora == base.lora


def test_stage_configs_validate_on_their_own():
    for cfg in (TrainConfig(), LoraStageConfig(), DPOStageConfig(), MiningConfig(), HSFTStageConfig(), EvalConfig()):
        cfg.validate()
    assert TrainConfig(micro_batch=2, grad_accum=3).global_batch(world_size=4) == 24


def test_one_precision_vocabulary_for_the_run_and_stage_0():
    from hsft.engine.config import PRECISIONS
    from hsft.engine.context import DTYPES

    assert set(DTYPES) == set(PRECISIONS)
    for name in PRECISIONS:
        replace_nested(RunConfig(), precision=name, **{"base.precision": name}).validate()
    with pytest.raises(ValueError, match=r"^base\.precision: must be one of bf16, fp32 or none"):
        replace_nested(RunConfig(), **{"base.precision": "float32"}).validate()


def test_shared_settings_name_fields_that_exist_with_one_type():
    from hsft.arguments import iter_fields
    from hsft.config import SHARED_SETTINGS

    types = {".".join(path): tp for path, _, tp, _ in iter_fields(RunConfig)}
    for setting in SHARED_SETTINGS:
        assert setting.fields and all(name in types for name in setting.fields), setting.key
        assert len({types[name] for name in setting.fields}) == 1, setting.key
