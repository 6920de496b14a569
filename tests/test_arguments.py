"""Command-line options generated from the typed configs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from hsft.arguments import add_config_arguments, apply_arguments
from hsft.config import RunConfig


def parse(argv):
    parser = argparse.ArgumentParser()
    dests = add_config_arguments(parser, RunConfig, aliases={"mining.tau": ["--tau"]})
    return apply_arguments(RunConfig(), parser.parse_args(argv), dests)


def test_nested_fields_become_stage_named_options():
    cfg = parse(["--hsft-lr", "3e-4", "--hsft-epochs", "2", "--lora-rank", "8", "--tau", "0.6",
                 "--data-format", "drive", "--output-dir", "x"])
    assert cfg.hsft.train.lr == 3e-4 and cfg.hsft.train.epochs == 2 and cfg.lora.rank == 8
    assert cfg.mining.tau == 0.6 and cfg.data.format == "drive" and cfg.output_dir == "x"
    # Untouched values keep their defaults, including the other stages' copies of TrainConfig.
    assert cfg.dpo.train.lr == RunConfig().dpo.train.lr and cfg.hsft.train.micro_batch == 1


def test_bools_optionals_and_flag_override():
    cfg = parse(["--resume", "--hsft-cache-features", "false", "--mining-hard-quantile", "0.2", "--model", "m"])
    assert cfg.resume is True and cfg.hsft.cache_features is False
    assert cfg.mining.hard_quantile == 0.2 and cfg.start_model == "m"
    assert parse(["--mining-hard-quantile", "none"]).mining.hard_quantile is None
    with pytest.raises(SystemExit):
        parse(["--resume", "maybe"])
    with pytest.raises(SystemExit):
        parse(["--hsft-lr", "fast"])


def test_percent_signs_in_help_do_not_break_help():
    @dataclass
    class Odd:
        share: float = field(default=0.5, metadata={"help": "fraction (50% by default)"})

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Odd)
    assert "50% by default" in parser.format_help()


# --- the commands in launch/: one language --------------------------------------------------------

from launch_scripts import launch_module  # noqa: E402


def _help(name: str, *argv: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        launch_module(name).main([*argv, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def test_a_misspelled_option_names_the_closest_one_in_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        launch_module("hsft").parse(["--lora-rnak", "4"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err == "launch/hsft.py: error: unknown option --lora-rnak; did you mean --lora-rank?\n"
    with pytest.raises(SystemExit):
        launch_module("predict").parse(["img.png", "--checkpoint", "m", "--ouput-dir", "o"])
    assert "did you mean --output-dir?" in capsys.readouterr().err


def test_help_shows_the_defaults_in_force():
    text = " ".join(_help("hsft").split())
    assert "LoRA rank r (default: 64; tiny recipe: 8)" in text
    assert "(default: 1e-05; tiny recipe: 0.001)" in text  # --hsft-lr
    assert "LoRA alpha (scaling = alpha / r) (default: 16.0)" in text  # the same in both recipes


# Every command that writes a directory names it --output-dir; every one that reads a dataset takes
# --data-format/--data-root; every one that takes a model takes a stage directory too (--checkpoint/--model).
WRITERS = {"hsft": (), "evaluate": (), "predict": (), "data": ("synth",), "bench_step": (),
           "bench_feature_cache": (), "experiments": (), "bench_kernels": (), "rehearse": ()}
READERS = {"hsft": (), "evaluate": (), "data": ("check",)}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_output_option_is_the_same_everywhere(name):
    import re

    text = _help(name, *WRITERS[name])
    assert "--output-dir" in text
    # An old spelling appears only as an alias listed beside --output-dir.
    for line in text.splitlines():
        if re.search(r"--out(put)?\b(?!-)", line):
            assert "--output-dir" in line, line


@pytest.mark.parametrize("name", sorted(READERS))
def test_the_data_options_are_the_same_everywhere(name):
    text = _help(name, *READERS[name])
    assert "--data-format" in text and "--data-root" in text


def test_a_model_the_pipeline_trained_keeps_its_recipe_and_precision(tmp_path):
    from hsft.model.directory import write_training_record

    model = tmp_path / "run" / "dpo" / "model"
    model.mkdir(parents=True)
    write_training_record(model, recipe="tiny", precision="fp32", embedded_default=True, stage="dpo")
    parse = launch_module("hsft").parse
    for given in (model, model.parent):  # the model directory or its stage directory
        cfg = parse(["--model", str(given), "--stages", "mining,hsft,eval"])
        assert cfg.recipe == "tiny" and cfg.precision == "fp32"
        assert cfg.hsft.train.lr == 1e-3 and cfg.lora.rank == 8
    # Told otherwise, it does otherwise.
    cfg = parse(["--model", str(model), "--recipe", "paper", "--precision", "bf16"])
    assert cfg.recipe == "paper" and cfg.precision == "bf16" and cfg.hsft.train.lr == 1e-5
    # A model without a record (a released checkpoint, imported) gets the paper recipe.
    released = tmp_path / "released"
    released.mkdir()
    cfg = parse(["--model", str(released)])
    assert cfg.recipe == "paper" and cfg.precision is None


# --- the main command's option list: at most 70 options, everything else through --set ---------------


def _main_parser():
    return launch_module("hsft").build_parser()[0]


def test_the_main_command_lists_at_most_70_options_each_once():
    import re

    parser = _main_parser()
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    assert len(shown) <= 70, [a.option_strings[0] for a in shown]
    # --help names each option at the start of exactly one line (no wrapped help line starts with an option).
    listed = [m.group(1) for m in re.finditer(r"^  (-[-\w]+)", parser.format_help(), flags=re.M)]
    assert sorted(listed) == sorted(a.option_strings[0] for a in shown)


def test_set_reaches_every_field_and_shared_settings_fan_out():
    parse = launch_module("hsft").parse
    cfg = parse(["--set", "base.referring=true", "--set", "unet.levels=3", "--set", "model.prompt.system=Be brief.",
                 "--set", "hsft.lr=2e-3", "--set", "mining.hard_quantile=none"])
    assert cfg.base.referring is True and cfg.unet.levels == 3 and cfg.model.prompt.system == "Be brief."
    assert cfg.hsft.train.lr == 2e-3 and cfg.mining.hard_quantile is None
    # A run-wide setting writes every training stage; a stage's own value, given too, wins.
    cfg = parse(["--train-clip", "0.5", "--set", "hsft.train.clip=2", "--set", "train.log_every=5"])
    assert (cfg.base.train.clip, cfg.lora.train.clip, cfg.dpo.train.clip, cfg.hsft.train.clip) == (0.5, 0.5, 0.5, 2.0)
    assert {cfg.base.train.log_every, cfg.lora.train.log_every, cfg.dpo.train.log_every, cfg.hsft.train.log_every} == {5}
    # One inference setting for mining (and the DPO pairs and validation that use its settings) and evaluation.
    cfg = parse(["--inference-batch-size", "3", "--inference-max-new-tokens", "9"])
    assert (cfg.mining.batch_size, cfg.eval.batch_size, cfg.mining.max_new_tokens, cfg.eval.max_new_tokens) == \
        (3, 3, 9, 9)


def test_no_option_given_leaves_the_recipe_defaults():
    from hsft.recipes import recipe_config

    assert dataclasses.replace(launch_module("hsft").parse([]), stages=RunConfig().stages) == recipe_config("tiny")


@pytest.mark.parametrize("argv, named", [
    (["--set", "base.refering=true"], "unknown key 'base.refering'; did you mean base.referring?"),
    (["--set", "hsft.train.lr=fast"], "hsft.train.lr: could not convert string to float: 'fast'"),
    (["--set", "base.referring=maybe"], "base.referring: expected true/false, got 'maybe'"),
    (["--set", "hsft.lr"], "expected KEY=VALUE, got 'hsft.lr'"),
])
def test_a_bad_set_is_one_line_naming_the_key(capsys, argv, named):
    with pytest.raises(SystemExit) as done:
        launch_module("hsft").parse(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


def test_a_bad_set_value_is_refused_by_the_dataclass_validation():
    cfg = launch_module("hsft").parse(["--set", "dpo.loss=kto"])
    with pytest.raises(ValueError, match=r"^dpo\.loss: must be one of"):
        cfg.validate()


@pytest.mark.parametrize("option, key", [
    ("--base-referring", "base.referring"), ("--base-source", "base.source"),
    ("--base-encoder-pool-size", "base.encoder_pool_size"), ("--model-prompt-instruction", "model.prompt.instruction"),
    ("--model-dtype", "model.dtype"), ("--unet-levels", "unet.levels"), ("--hsft-min-lr", "hsft.train.min_lr"),
    ("--mining-batch-size", "mining.batch_size"), ("--eval-max-new-tokens", "eval.max_new_tokens"),
    ("--train-log-every", "train.log_every"),
])
def test_an_option_that_moved_to_set_names_its_set_form_in_one_line(capsys, option, key):
    with pytest.raises(SystemExit) as done:
        launch_module("hsft").parse([option, "1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"launch/hsft.py: error: unknown option {option}; {key} is set with --set {key}=VALUE "
                   "(launch/hsft.py --help-all lists every key)\n")


def test_help_all_lists_every_key_with_its_option(capsys):
    from hsft.arguments import settable_keys
    from hsft.config import SHARED_SETTINGS

    with pytest.raises(SystemExit) as done:
        launch_module("hsft").parse(["--help-all"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(" = ")[0].strip() for line in lines if " = " in line]
    assert keys == settable_keys(RunConfig, SHARED_SETTINGS)
    assert any(line.startswith("  hsft.train.lr = 1e-05; tiny recipe: 0.001 [--hsft-lr]  : ") for line in lines)
    assert any(line.startswith("  start_model = None [--model]  : ") for line in lines)


def test_every_study_override_and_recipe_key_is_a_settable_key():
    from hsft.arguments import resolve_key
    from hsft.config import SHARED_SETTINGS
    from hsft.experiments.suites import SUITES
    from hsft.recipes import RECIPES

    cfg = RunConfig()
    keys = {key for recipe in RECIPES.values() for key in recipe}
    for name, (build, settings) in SUITES.items():
        keys |= {key for key, _ in settings}
        for arm in build(cfg).arms():
            keys |= {key for key, _ in arm.overrides}
    assert {"mining.tau", "hsft.train.lr", "hsft.seg_form", "hsft.rounds", "base.encoder_pool_size"} <= keys
    for key in sorted(keys):
        paths, _ = resolve_key(RunConfig, key, SHARED_SETTINGS)
        assert paths == (tuple(key.split(".")),), key


def test_resume_compares_the_fields_that_options_and_set_write():
    """run_config.json keeps one entry per field: a run-wide setting shows up as each stage's field."""
    import json

    from hsft.pipeline import settings_that_differ

    parse = launch_module("hsft").parse
    saved = json.loads(json.dumps(dataclasses.asdict(parse([]))))
    assert settings_that_differ(parse(["--set", "hsft.train.lr=1e-3", "--inference-batch-size", "8"]), saved) == []
    differ = settings_that_differ(parse(["--train-weight-decay", "0.02", "--set", "base.referring=true"]), saved)
    assert sorted(d.split(" ")[0] for d in differ) == ["base.referring", "base.train.weight_decay",
                                                      "dpo.train.weight_decay", "hsft.train.weight_decay",
                                                      "lora.train.weight_decay"]


def test_the_study_command_takes_the_same_options_and_set():
    cfg, args = launch_module("experiments").parse(["--suite", "smoke", "--set", "unet.levels=3",
                                                    "--train-clip", "0.5", "--hsft-lr", "2e-3"])
    assert cfg.unet.levels == 3 and cfg.lora.train.clip == 0.5 and cfg.hsft.train.lr == 2e-3 and args.suite == "smoke"
