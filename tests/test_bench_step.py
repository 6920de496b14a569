"""launch/bench_step.py refuses bad arguments in one line before building the (large) model."""

from __future__ import annotations

import pytest
import torch
from launch_scripts import launch_main


@pytest.mark.parametrize("argv,message", [
    (["--stage", "lora,warp"], "--stage: unknown ['warp']"),
    (["--steps", "0"], "--steps and --micro-batch must be >= 1"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_arguments_stop_before_the_model_is_built(argv, message, capsys, monkeypatch):
    import hsft.bench.step as step

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be built for bad arguments")

    monkeypatch.setattr(step, "build_real_model", refuse)
    assert launch_main("bench_step")(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
