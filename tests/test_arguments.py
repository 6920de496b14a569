"""Command-line options generated from the typed configs."""

from __future__ import annotations

import argparse
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
