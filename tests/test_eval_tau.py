"""The evaluator calls the same samples hard as mining: eval tau follows the mining tau unless set."""

from __future__ import annotations

import pytest

from hsft import arguments
from hsft.config import EvalConfig, MiningConfig, RunConfig, replace_nested

from launch_scripts import launch_module


def test_eval_tau_follows_the_mining_tau_unless_set():
    assert EvalConfig().tau is None and EvalConfig().threshold == MiningConfig().tau
    run = replace_nested(RunConfig(), **{"mining.tau": 0.6})
    assert run.eval_settings().tau == 0.6 and run.eval_settings().threshold == 0.6
    run = replace_nested(RunConfig(), **{"mining.tau": 0.6, "eval.tau": 0.5})
    assert run.eval_settings().tau == 0.5
    with pytest.raises(ValueError, match="eval.tau"):
        EvalConfig(tau=1.5).validate()


def test_main_command_tau_option_reaches_the_evaluator():
    module = launch_module("hsft")
    cfg = module.parse(["--tau", "0.6"])
    assert cfg.mining.tau == 0.6 and cfg.eval_settings().threshold == 0.6
    assert module.parse(["--tau", "0.6", "--eval-tau", "0.7"]).eval_settings().threshold == 0.7
    assert arguments.option_name(("eval", "tau")) == "--eval-tau"
