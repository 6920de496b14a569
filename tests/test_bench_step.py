"""launch/bench_step.py refuses bad arguments in one line before building the (large) model."""

from __future__ import annotations

import pytest
import torch

from launch_scripts import launch_main


@pytest.mark.parametrize("argv,message", [
    (["--stage", "lora,warp"], "--stage: unknown ['warp']"),
    (["--steps", "0"], "--steps and --micro-batch must be >= 1"),
    (["--compile", "default,turbo"], "--compile: unknown mode(s) ['turbo']"),
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


def test_cached_step_rows_with_profile_and_compile(tmp_path, monkeypatch, make_tiny_model):
    """The HSFT rows on a small stand-in model: uncached, cached, its profile, and the compiled decoder."""
    import json

    import hsft.bench.step as step

    monkeypatch.setattr(step, "build_real_model",
                        lambda shape, device, dtype: make_tiny_model().to(device, dtype))
    summary = step.run(shape="sa2va-1b", stages=["hsft"], device="cpu", dtype="float32", steps=2, warmup=1,
                       micro_batch=1, image_size=64, out=tmp_path, profile=True, compile_modes=("default",))
    rows = {row["config"]: row for row in summary["rows"]}
    assert list(rows) == ["hsft uncached", "hsft cached", "hsft cached, compiled (default)"]
    profile = rows["hsft cached"]["profile"]
    assert profile["aten_ops_per_step"] > 10 and profile["top_host_self_ms_per_step"]
    assert rows["hsft cached, compiled (default)"]["compile_s"] > 0
    assert set(summary["hsft_cache_speedup_by_config"]) == {"hsft cached", "hsft cached, compiled (default)"}
    assert json.loads((tmp_path / "step_sa2va-1b_cpu.json").read_text())["rows"][2]["config"].endswith("(default)")
    assert "aten ops" in step.format_summary(summary)


def test_a_compiler_failure_is_a_row_not_a_crash(tmp_path, monkeypatch, make_tiny_model):
    import hsft.bench.step as step

    def broken(fn, options):
        def decode(*args):
            raise AssertionError("expected size 256==256, stride 4096==1 at dim=1\nmore detail")
        return decode

    monkeypatch.setattr(step, "build_real_model",
                        lambda shape, device, dtype: make_tiny_model().to(device, dtype))
    monkeypatch.setattr(torch, "compile", broken)
    summary = step.run(shape="sa2va-1b", stages=["hsft"], device="cpu", dtype="float32", steps=1, warmup=0,
                       micro_batch=1, image_size=64, out=None, compile_modes=("default",))
    failed = summary["rows"][-1]
    assert failed == {"config": "hsft cached, compiled (default)",
                      "error": "AssertionError: expected size 256==256, stride 4096==1 at dim=1"}
    assert "failed: AssertionError" in step.format_summary(summary)
    assert set(summary["hsft_cache_speedup_by_config"]) == {"hsft cached"}


def test_launch_bound_rows_on_the_cpu(monkeypatch, make_tiny_model):
    """--cuda-graph: the fused-AdamW rows run anywhere; the graph capture is a row that says it needs CUDA."""
    import hsft.bench.step as step

    monkeypatch.setattr(step, "build_real_model",
                        lambda shape, device, dtype: make_tiny_model().to(device, dtype))
    summary = step.run(shape="sa2va-1b", stages=["hsft"], device="cpu", dtype="float32", steps=1, warmup=0,
                       micro_batch=1, image_size=64, out=None, cuda_graph=True)
    rows = {row["config"]: row for row in summary["rows"]}
    assert rows["hsft cached, CUDA graph + fused AdamW"] == {"config": "hsft cached, CUDA graph + fused AdamW",
                                                             "error": "needs a CUDA device"}
    assert rows["hsft cached, fused AdamW"]["median_s"] > 0
    assert set(summary["hsft_cache_speedup_by_config"]) == {"hsft cached", "hsft cached, fused AdamW"}
    assert "than hsft uncached, fused AdamW" in step.format_summary(summary)
