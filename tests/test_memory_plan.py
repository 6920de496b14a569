"""The memory plan (hsft.memory_plan): exact parameter counts from a model directory, terms that move the
right way with tiles, micro-batch, precision and optimizer offload, `launch/hsft.py --plan`, and the
plan against peaks measured at the tiny size."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hsft.config import RunConfig, replace_nested
from hsft.engine.ds_config import apply_precision, load_ds_config
from hsft.memory_plan import (GiB, config_fits, format_plan, model_shape, parse_size, plan_run, shape_of_model)
from hsft.model import build_model, load_model, save_model
from hsft.model.chain import make_lean

from launch_scripts import REPO, launch_main, run_deepspeed


DS = REPO / "ds_configs"
STAGES = ("lora", "dpo", "mining", "hsft", "control", "eval")
DRIVE, CHASE = (584, 565), (960, 999)


@pytest.fixture(scope="module")
def real_1b():
    """The Sa2VA-1B shape, built on the meta device (nothing allocated)."""
    from hsft.bench.rehearsal import build_shape_model

    with torch.device("meta"):
        model = build_shape_model("sa2va-1b", device=torch.device("meta"), dtype=torch.bfloat16)
    return shape_of_model(model)


def _plan(shape, *, device="cuda", precision="bf16", config="zero2.json", train=(CHASE, DRIVE), test=(DRIVE,),
          cfg=None, world_size=1):
    cfg = cfg or dataclasses.replace(RunConfig(), stages=STAGES)
    ds = apply_precision(load_ds_config(DS / config), precision)
    return plan_run(cfg, shape, ds_config=ds, device=device, precision=precision, world_size=world_size,
                    train_sizes=list(train), test_sizes=list(test))


def test_model_shape_from_a_directory_counts_every_parameter(tmp_path):
    model = build_model(RunConfig().model)
    save_model(model, tmp_path / "full")
    shape = model_shape(tmp_path / "full")
    assert shape.parts == {k: v for k, v in model.parameter_counts().items() if k != "total"}
    assert shape.total == model.parameter_counts()["total"]
    # a lean directory (a stage's changes) has the shape of the chain's full model
    with torch.no_grad():
        model.text_hidden_fcs[0].weight.add_(1)
    save_model(model, tmp_path / "lean")
    make_lean(tmp_path / "lean", tmp_path / "full", load_model)
    assert model_shape(tmp_path / "lean") == shape


def test_the_1b_shape(real_1b):
    assert 1.0e9 < real_1b.total < 1.05e9 and real_1b.image_tokens == 256 and real_1b.tiling
    assert real_1b.tiles(*CHASE) == 10 and real_1b.tiles(*DRIVE) == 1
    assert real_1b.tokens(10) - real_1b.tokens(1) == 9 * 256


def test_monotonic_in_tiles_and_micro_batch(real_1b):
    small = _plan(real_1b, train=(DRIVE, DRIVE))
    large = _plan(real_1b, train=(CHASE, DRIVE))
    assert large.longest_tiles == 10 and small.longest_tiles == 1
    assert large.stages["lora"].activations_gib > 2 * small.stages["lora"].activations_gib
    assert large.stages["mining"].activations_gib >= small.stages["mining"].activations_gib
    one = _plan(real_1b, cfg=replace_nested(dataclasses.replace(RunConfig(), stages=STAGES),
                                            **{"lora.train.micro_batch": 1, "hsft.train.micro_batch": 1}))
    two = _plan(real_1b, cfg=replace_nested(dataclasses.replace(RunConfig(), stages=STAGES),
                                            **{"lora.train.micro_batch": 2, "hsft.train.micro_batch": 2}))
    assert two.stages["lora"].gpu_gib > one.stages["lora"].gpu_gib
    assert two.stages["hsft"].activations_gib >= one.stages["hsft"].activations_gib


def test_offload_moves_the_optimizer_to_the_host(real_1b):
    cfg = replace_nested(dataclasses.replace(RunConfig(), stages=STAGES), **{"lora.rank": 256})
    plain, offload = _plan(real_1b, cfg=cfg), _plan(real_1b, cfg=cfg, config="zero2_offload.json")
    assert offload.offload_optimizer and not plain.offload_optimizer
    for stage in ("lora", "hsft"):
        moved = plain.stages[stage].optimizer_gib
        assert moved > 0
        assert offload.stages[stage].gpu_gib == pytest.approx(plain.stages[stage].gpu_gib - moved)
        assert offload.stages[stage].host_gib == pytest.approx(plain.stages[stage].host_gib + moved)
    assert offload.stages["mining"].gpu_gib == pytest.approx(plain.stages["mining"].gpu_gib)


def test_precision_and_ranks(real_1b):
    bf16, fp32 = _plan(real_1b), _plan(real_1b, precision="fp32")
    assert fp32.stages["mining"].params_gib == pytest.approx(2 * bf16.stages["mining"].params_gib)
    assert bf16.stages["mining"].params_gib == pytest.approx(real_1b.total * 2 / GiB)
    one, four = _plan(real_1b), _plan(real_1b, world_size=4)
    assert four.stages["hsft"].optimizer_gib == pytest.approx(one.stages["hsft"].optimizer_gib / 4)
    cpu = _plan(real_1b, device="cpu", precision="fp32")
    assert cpu.peak_gpu_gib is None and cpu.stages["lora"].host_gib > cpu.stages["lora"].params_gib


def test_which_configs_fit(real_1b):
    plans = {"zero2.json": _plan(real_1b), "zero2_offload.json": _plan(real_1b, config="zero2_offload.json")}
    assert all(config_fits(plans, 80).values())
    assert not any(config_fits(plans, 1).values())
    text = format_plan(plans["zero2.json"])
    assert "| lora |" in text and "GPU" in text and "1.020 B parameters" in text


def test_parse_size():
    assert parse_size("24GiB") == 24 and parse_size("80GB") == 80 and parse_size("40") == 40
    assert parse_size("2048MiB") == 2
    for bad in ("", "24XB", "-3GiB", "0"):
        with pytest.raises(ValueError, match="--plan-gpu-memory"):
            parse_size(bad)


def test_plan_command_prints_the_plan_and_the_fitting_configs(capsys, tmp_path):
    main = launch_main("hsft")
    code = main(["--plan", "--plan-gpu-memory", "24GiB", "--deepspeed", str(DS / "zero2.json"),
                 "--output-dir", str(tmp_path / "run"), "--data-synthetic-train", "16", "--data-synthetic-test", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory plan (zero2.json, on a GPU)" in out and "| base |" in out and "| eval |" in out
    assert "- zero2.json:" in out and "- zero2_offload.json:" in out and "fits" in out
    assert not (tmp_path / "run").exists()  # --plan runs nothing


def test_plan_bad_size_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch_main("hsft")(["--plan", "--plan-gpu-memory", "lots"])
    assert exit_info.value.code == 2
    assert "--plan-gpu-memory: expected a size such as 24GiB" in capsys.readouterr().err


@pytest.mark.slow
def test_every_run_records_its_plan_beside_measured_peaks(tmp_path):
    """The main command at the tiny size: report.json holds the plan and each stage's measured peak; the
    plan is within 25 % of them (at this size the process's own footprint dominates both)."""
    args = ["--output-dir", str(tmp_path / "run"), "--data-synthetic-train", "12", "--data-synthetic-test", "4",
            "--data-synthetic-size", "64", "--lora-epochs", "1", "--hsft-epochs", "1", "--precision", "fp32",
            "--base-pool-size", "8", "--set", "base.encoder_pool_size=0", "--base-epochs", "1", "--stages",
            "base,lora,mining,hsft,eval", "--set", "eval.bootstrap_resamples=50"]
    proc = run_deepspeed("hsft", args, tmp_path)
    assert "memory plan:" in proc.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    plan, measured = report["memory_plan"]["stages"], report["resources"]
    for stage in ("lora", "mining", "hsft", "eval"):
        assert measured[stage]["host_peak_reset"]
        ratio = plan[stage]["host_gib"] / measured[stage]["peak_host_gib"]
        assert 0.75 < ratio < 1.25, (stage, ratio, plan[stage]["host_gib"], measured[stage]["peak_host_gib"])


def test_only_lora_and_standalone_runs_hold_a_float32_copy_of_the_model_to_export(real_1b):
    full_copy = real_1b.total * 4 / GiB
    plan = _plan(real_1b, device="cpu", precision="fp32")
    assert plan.stages["lora"].export_gib >= full_copy
    assert plan.stages["hsft"].export_gib < full_copy / 10 and plan.stages["dpo"].export_gib < full_copy / 10
    standalone = _plan(real_1b, device="cpu", precision="fp32",
                       cfg=dataclasses.replace(RunConfig(), stages=STAGES, standalone=True))
    assert standalone.stages["hsft"].export_gib >= full_copy
