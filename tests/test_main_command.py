"""The real entry point, `deepspeed launch/hsft.py`, end to end on the embedded default, plus the
two-rank equivalence and the script's exit on bad input (the bad inputs themselves: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_scripts import REPO, ZERO2, exit_status, run_deepspeed

pytestmark = pytest.mark.slow  # every test launches the command or reads what the module's launch wrote

# Smaller than the defaults so the suite stays quick (stage 0 as in the default run); the stage logic is
# the same.
SMALL = ["--data-synthetic-train", "24", "--data-synthetic-test", "12", "--data-synthetic-size", "96",
         "--lora-epochs", "1", "--lora-rank", "8", "--hsft-epochs", "2", "--precision", "fp32"]


def launch(args: list[str], tmp: Path, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    return run_deepspeed("hsft", args, tmp, ranks=ranks, check=check)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    # Two checkpoints per stage, so a test can fall back to the epoch before the last one.
    proc = launch(["--output-dir", str(tmp / "run"), "--keep-checkpoints", "2", *SMALL], tmp)
    return tmp, proc


def test_main_command_runs_every_stage_and_writes_the_report(full_run):
    tmp, proc = full_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["stages"] == ["base", "lora", "dpo", "mining", "hsft", "control", "eval"]
    stages = [row["stage"] for row in report["evaluation"]]
    assert stages == ["base", "lora", "dpo", "hsft", "control"]
    for row in report["evaluation"]:
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["iou"] <= row["dice"] + 1e-9
        assert row["n"] == 12
    assert report["evaluation"][0]["delta_base"] == 0.0
    # The pre-trained stand-in reaches a moderate Dice on held-out data and answers with [SEG].
    assert report["evaluation"][0]["dice"] > 0.3 and report["evaluation"][0]["seg_rate"] > 0.9
    mined = json.loads((run / "mining" / "hard_samples.json").read_text())
    assert sum(r["count"] for r in mined["table"]) == report["data"]["train"]
    assert all(r["dice"] < 0.75 for r in mined["hard"])
    train_ids = {r["id"] for r in mined["all"]}
    assert len(train_ids) == report["data"]["train"]  # mined on the training split only
    for stage in ("base", "lora", "dpo", "hsft"):
        assert (run / stage / "model" / "hsft_model.json").is_file(), stage
    metrics = json.loads((run / "hsft" / "metrics.json").read_text())
    assert metrics["samples"] == len(mined["hard"]) and metrics["optimizer_steps"] > 0
    hsft_weights = load_file(str(run / "hsft" / "trainable.safetensors"))
    assert hsft_weights and all(k.startswith(("text_hidden_fcs", "sam2.mask_decoder", "sam2.prompt_encoder"))
                                for k in hsft_weights)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb" / "hsft"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"hsft/loss", "hsft/dice_loss", "hsft/bce", "hsft/lr", "hsft/grad_norm", "hsft/samples_per_s",
            "hsft/epoch_val_dice"} <= tags
    steps = [e.step for e in events.Scalars("hsft/loss")]
    lora_end = json.loads((run / "lora" / "metrics.json").read_text())["global_step_end"]
    assert steps == sorted(steps) and steps[0] > lora_end  # the global step continues across stages
    text = (run / "report.md").read_text()
    assert "| hsft |" in text and "Hard set" in text
    assert "hsft run report" in proc.stdout


def test_the_control_beside_hsft_and_each_stages_effect_with_an_interval(full_run):
    tmp, _ = full_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    rows = {row["stage"]: row for row in report["evaluation"]}
    # Each stage is measured against the model it started from; the control starts where HSFT starts.
    assert [rows[s]["started_from"] for s in ("base", "lora", "dpo", "hsft", "control")] == \
        [None, "base", "lora", "dpo", "dpo"]
    assert rows["control"]["beside"] == "hsft" and rows["hsft"]["beside"] is None
    for stage in ("lora", "dpo", "hsft", "control"):
        effect = rows[stage]["effect"]
        assert effect["low"] <= effect["mean"] <= effect["high"]
        assert effect["mean"] == pytest.approx(rows[stage]["dice"] - rows[rows[stage]["started_from"]]["dice"], abs=1e-9)
    hsft, control = (json.loads((run / s / "metrics.json").read_text()) for s in ("hsft", "control"))
    # Matched compute: the same number of samples and optimizer steps, different samples.
    assert control["samples"] == hsft["samples"] and control["optimizer_steps"] == hsft["optimizer_steps"]
    assert control["train_config"] == hsft["train_config"]
    assert report["control"]["hard_set_loss_before"] == pytest.approx(report["hsft"]["hard_set_loss_before"], rel=1e-5)
    assert "hard_set_loss" in hsft["epochs"][-1] and "pair_reward_accuracy" in report["dpo"]
    text = (run / "report.md").read_text()
    assert "| control |" in text and "hsft - control" in text and "loss over the hard set" in text


def test_lora_changes_the_held_out_masks(full_run):
    """Regression: with LoRA training nothing on the mask path of a decoder that ignores the [SEG] prompt,
    every held-out image kept stage 0's Dice exactly. The tiny recipe trains the mask decoder in LoRA, so
    its masks must differ from stage 0's on a good part of the held-out images."""
    import csv

    tmp, _ = full_run
    dice = {}
    for stage in ("base", "lora"):
        with open(tmp / "run" / "eval" / stage / "per_sample.csv", newline="") as handle:
            dice[stage] = {row["id"]: float(row["generate_dice"]) for row in csv.DictReader(handle)}
    assert dice["base"].keys() == dice["lora"].keys()
    changed = [i for i in dice["base"] if abs(dice["lora"][i] - dice["base"][i]) > 1e-3]
    assert len(changed) >= len(dice["base"]) // 3, f"LoRA changed the Dice of only {len(changed)} held-out images"


@pytest.mark.parametrize("stage", ["lora", "dpo", "hsft", "control"])
def test_a_stage_that_changes_its_weights_logs_a_nonzero_grad_norm(full_run, stage):
    tmp, _ = full_run
    run = tmp / "run"
    metrics = json.loads((run / stage / "metrics.json").read_text())
    started = json.loads((run / "report.json").read_text())
    start = {row["stage"]: row["started_from"] for row in started["evaluation"]}[stage]
    trained = load_file(str(run / stage / "trainable.safetensors"))
    from hsft.model import load_model

    before = dict(load_model(run / start / "model", dtype="float32").named_parameters())
    assert len(metrics["grad_norms"]) == metrics["optimizer_steps"] > 0

    def moved(name, value):
        if name in before:
            return not torch.equal(before[name].detach(), value)
        return "lora_B" in name and bool(value.abs().max() > 0)  # LoRA's B starts at zero

    changed = any(moved(name, value) for name, value in trained.items())
    if changed:
        assert all(g > 0 for g in metrics["grad_norms"]), f"{stage} changed its weights but logged {metrics['grad_norms']}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb" / stage))
    events.Reload()
    assert [e.value for e in events.Scalars(f"{stage}/grad_norm")] == pytest.approx(metrics["grad_norms"], rel=1e-6)


def test_global_step_continues_across_stages(full_run):
    tmp, _ = full_run
    run = tmp / "run"
    ends = [json.loads((run / s / "metrics.json").read_text())["global_step_end"] for s in ("lora", "dpo", "hsft")]
    assert ends == sorted(ends) and len(set(ends)) == 3


def test_existing_output_needs_resume_or_overwrite(full_run, command_dir, capsys):
    """In-process, on a copy of the finished run."""
    tmp, _ = full_run
    run = command_dir / "run"
    shutil.copytree(tmp / "run", run)
    assert exit_status("hsft", ["--deepspeed", str(ZERO2), "--output-dir", str(run), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume finds every stage complete: nothing runs, and the run's report is printed again.
    assert exit_status("hsft", ["--deepspeed", str(ZERO2), "--output-dir", str(run), "--resume", "--stages",
                                "hsft,eval", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "hsft run report" in out
    assert (run / "hsft" / "metrics.json").read_text() == (tmp / "run" / "hsft" / "metrics.json").read_text()


def test_resume_after_a_crash_reproduces_the_uninterrupted_stage(full_run):
    tmp, _ = full_run
    run = tmp / "crashed"
    shutil.copytree(tmp / "run", run)
    hsft = run / "hsft"
    uninterrupted = json.loads((hsft / "metrics.json").read_text())
    weights = load_file(str(hsft / "trainable.safetensors"))
    # A crash during HSFT's second (last) epoch: no result, only the epoch-1 checkpoint is complete.
    shutil.rmtree(hsft / "model")
    (hsft / "metrics.json").unlink()
    (hsft / "trainable.safetensors").unlink()
    ckpts = hsft / "checkpoints"
    shutil.rmtree(ckpts / "epoch0002")
    (ckpts / "COMPLETE").write_text("epoch0001\n")
    launch(["--output-dir", str(run), "--resume", "--stages", "hsft", *SMALL], tmp)
    resumed = json.loads((hsft / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("epoch0001")
    assert resumed["losses"] == uninterrupted["losses"]  # the epoch before the crash from the checkpoint's record
    assert resumed["global_step_end"] == uninterrupted["global_step_end"]
    again = load_file(str(hsft / "trainable.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_empty_hard_set_skips_hsft_and_still_evaluates(full_run):
    tmp, _ = full_run
    proc = launch(["--model", str(tmp / "run" / "dpo" / "model"), "--stages", "mining,hsft,eval", "--tau", "1e-6",
                   "--output-dir", str(tmp / "no_hard"), *SMALL], tmp)
    assert "HSFT skipped" in proc.stdout
    report = json.loads((tmp / "no_hard" / "report.json").read_text())
    assert report["hsft"]["skipped"] and report["hsft"]["samples"] == 0
    rows = {row["stage"]: row for row in report["evaluation"]}
    assert rows["hsft"]["dice"] == rows["start"]["dice"]  # the model was passed on unchanged


def test_main_command_on_a_dataset_folder(full_run):
    tmp, _ = full_run
    data = tmp / "folder_data"
    subprocess.run([sys.executable, str(REPO / "launch" / "data.py"), "synth", "--out", str(data), "--n", "20",
                    "--seed", "5", "--size", "80", "--quiet"], check=True, capture_output=True, timeout=300)
    launch(["--model", str(tmp / "run" / "dpo" / "model"), "--stages", "mining,hsft,eval", "--data-format", "folder",
            "--data-root", str(data), "--output-dir", str(tmp / "folder_run"), "--hard-quantile", "0.5",
            "--hsft-epochs", "1", "--precision", "fp32"], tmp)
    report = json.loads((tmp / "folder_run" / "report.json").read_text())
    assert report["data"]["format"] == "folder"
    assert report["data"]["train"] + report["data"]["val"] + report["data"]["test"] == 20
    mined = json.loads((tmp / "folder_run" / "mining" / "hard_samples.json").read_text())
    assert len(mined["all"]) == report["data"]["train"] and len(mined["hard"]) == -(-len(mined["all"]) // 2)
    assert all(row["n"] == report["data"]["test"] for row in report["evaluation"])


def test_two_ranks_match_one_rank_for_the_same_global_batch(full_run):
    tmp, _ = full_run
    start = tmp / "run" / "dpo" / "model"
    common = ["--model", str(start), "--stages", "mining,hsft", "--hsft-epochs", "1", "--hsft-grad-accum", "1",
              "--hsft-lr", "1e-3", *SMALL]
    launch(["--output-dir", str(tmp / "one"), "--hsft-micro-batch", "2", *common], tmp, ranks=1)
    launch(["--output-dir", str(tmp / "two"), "--hsft-micro-batch", "1", *common], tmp, ranks=2)
    one = json.loads((tmp / "one" / "hsft" / "metrics.json").read_text())
    two = json.loads((tmp / "two" / "hsft" / "metrics.json").read_text())
    assert one["optimizer_steps"] == two["optimizer_steps"] > 0
    assert json.loads((tmp / "one" / "mining" / "hard_samples.json").read_text())["all"] == \
        json.loads((tmp / "two" / "mining" / "hard_samples.json").read_text())["all"]
    wa = load_file(str(tmp / "one" / "hsft" / "trainable.safetensors"))
    wb = load_file(str(tmp / "two" / "hsft" / "trainable.safetensors"))
    assert sorted(wa) == sorted(wb)
    # Same global batch: the same logged losses and the same weights up to float summation order. What the
    # test must tell apart: without gradient averaging across ranks, each rank would step on its own
    # gradient and most weights would differ by about lr = 1e-3 per step. With averaging, only the summation
    # order differs (it changes with the CPU and thread count); AdamW's update m / sqrt(v) can turn that into
    # a difference of up to about lr on the few weights whose gradient is near zero. So the bound is on the
    # share of weights that differ by a tenth of lr or more, plus a ceiling no correct run can exceed.
    lr, steps = 1e-3, one["optimizer_steps"]
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4, abs=1e-6)
    diffs = torch.cat([(wa[name].double() - wb[name].double()).abs().flatten() for name in wa])
    share_apart = (diffs > lr / 10).double().mean().item()
    assert share_apart < 0.01, f"{share_apart:.2%} of the weights differ by more than lr/10"
    assert diffs.max().item() < 2 * lr * steps


def test_main_command_from_local_transformers_checkpoints(tmp_path):
    from plain_checkpoints import save_plain_checkpoints

    vlm_dir, sam_dir, _, _ = save_plain_checkpoints(tmp_path / "ckpt")
    proc = launch(["--vlm", vlm_dir, "--sam2", sam_dir, "--output-dir", str(tmp_path / "run"), "--precision", "fp32",
                   "--data-synthetic-train", "8", "--data-synthetic-test", "4", "--data-synthetic-size", "64",
                   "--hsft-epochs", "1"], tmp_path)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # Without a model the stand-in stage 0 is skipped; the composite is built from the two directories.
    assert report["stages"] == ["lora", "dpo", "mining", "hsft", "control", "eval"]
    assert report["recipe"] == "paper"  # a real checkpoint starts from the published settings
    assert report["start"].startswith("--vlm")
    assert (tmp_path / "run" / "init" / "model" / "hsft_model.json").is_file()
    assert [row["stage"] for row in report["evaluation"]] == ["start", "lora", "dpo", "hsft", "control"]
    assert "hsft run report" in proc.stdout


def test_the_script_itself_prints_one_line_and_exits_2(tmp_path):
    """The real `python launch/hsft.py` in its own process: the exit status and the one line reach the shell."""
    env = {**os.environ, "HSFT_CACHE": str(tmp_path / "cache")}
    env.pop("HSFT_DEBUG", None)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "hsft.py"), "--deepspeed", str(ZERO2),
                           "--model", "nowhere"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hsft: error:")]
    assert len(errors) == 1 and "--model nowhere: no such directory" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
