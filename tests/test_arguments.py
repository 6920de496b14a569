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
