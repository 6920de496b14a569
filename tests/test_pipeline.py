"""The pipeline as a table of stages: every row's shape, the loop that hands each stage the newest
model, resume skipping finished stages, and the report joined from the stages' parts. The stages
are replaced by fast fakes here; tests/test_main_command.py runs the real ones."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing

import pytest

from hsft import pipeline
from hsft.config import DEFAULT_STAGES, STAGE_ORDER, RunConfig
from hsft.engine.files import write_json
from hsft.model import save_model
from hsft.stages.training import StageResult, model_dir


def test_the_table_lists_every_stage_once_with_the_common_entry():
    assert tuple(stage.name for stage in pipeline.STAGES) == STAGE_ORDER
    hints = typing.get_type_hints(RunConfig)
    for stage in pipeline.STAGES:
        assert stage.config in hints, f"{stage.name}: RunConfig has no field {stage.config!r}"
        params = list(inspect.signature(stage.run).parameters)
        assert params == ["ctx", "cfg", "start"], f"{stage.name}.run takes {params}"
        cfg_type = typing.get_type_hints(stage.run)["cfg"]
        assert cfg_type is hints[stage.config], f"{stage.name}.run takes {cfg_type}, RunConfig.{stage.config} is " \
                                                f"{hints[stage.config]}"


@pytest.fixture
def fake_stages(monkeypatch, tiny_model):
    """Every stage replaced by a fake that records the model it was handed; training stages write a
    model directory and a metrics.json like the real ones."""
    calls: list[tuple[str, object]] = []

    def fake(name: str, trains: bool):
        def run(ctx, cfg, start):
            calls.append((name, start))
            if not trains:
                return StageResult(summary={"ran": name}, section=[f"## section of {name}", ""])
            stage_dir = ctx.stage_dir(name)
            save_model(tiny_model, model_dir(stage_dir))
            ctx.global_step += 10
            write_json(stage_dir / "metrics.json", {"stage": name, "global_step_end": ctx.global_step})
            return StageResult(model_dir=model_dir(stage_dir), summary={"ran": name}, notes=[f"- note of {name}"])
        return run

    for stage in pipeline.STAGES:
        monkeypatch.setitem(pipeline.STAGE_BY_NAME, stage.name,
                            dataclasses.replace(stage, run=fake(stage.name, stage.trains)))
    return calls


def _cfg(tmp_path, **changes) -> RunConfig:
    from hsft.config import replace_nested

    return replace_nested(RunConfig(), output_dir=str(tmp_path / "run"), precision="fp32",
                          **{"data.synthetic_train": 4, "data.synthetic_test": 2, **changes})


def test_each_stage_starts_from_the_newest_model_and_the_report_joins_their_parts(fake_stages, tmp_path):
    report = pipeline.run_pipeline(_cfg(tmp_path))
    out = tmp_path / "run"
    assert [name for name, _ in fake_stages] == list(DEFAULT_STAGES)
    starts = dict(fake_stages)
    assert starts["base"] is None
    assert starts["lora"] == model_dir(out / "base") and starts["dpo"] == model_dir(out / "lora")
    # mining trains nothing: HSFT starts from the DPO model
    assert starts["mining"] == model_dir(out / "dpo") and starts["hsft"] == model_dir(out / "dpo")
    # the control sits beside HSFT: it starts from HSFT's starting model, and passes nothing on
    assert starts["control"] == model_dir(out / "dpo") and starts["eval"] == model_dir(out / "hsft")
    assert report["lora"] == {"ran": "lora"} and report["evaluation"] == {"ran": "eval"}
    assert json.loads((out / "report.json").read_text())["mining"] == {"ran": "mining"}
    text = (out / "report.md").read_text()
    # the held-out results lead, the other sections follow in pipeline order, then the notes
    assert text.index("section of eval") < text.index("section of mining") < text.index("## Stages")
    assert [line for line in text.splitlines() if line.startswith("- note of")] == \
        [f"- note of {s}" for s in ("base", "lora", "dpo", "hsft", "control")]


def test_resume_skips_finished_training_stages_and_continues_the_step(fake_stages, tmp_path):
    pipeline.run_pipeline(_cfg(tmp_path))
    fake_stages.clear()
    report = pipeline.run_pipeline(_cfg(tmp_path, resume=True))
    # base, lora, dpo, hsft and control are complete; mining and eval always run again
    assert [name for name, _ in fake_stages] == ["mining", "eval"]
    assert dict(fake_stages)["mining"] == model_dir(tmp_path / "run" / "dpo")
    assert "lora model" in report["written"]


def test_the_models_to_evaluate_and_what_each_started_from(monkeypatch, fake_stages, tmp_path):
    seen = {}

    def record(ctx, cfg, start):
        seen.update(models=[name for name, _ in ctx.models], started_from=dict(ctx.started_from),
                    variants=dict(ctx.variants))
        return StageResult()

    monkeypatch.setitem(pipeline.STAGE_BY_NAME, "eval", dataclasses.replace(pipeline.STAGE_BY_NAME["eval"], run=record))
    pipeline.run_pipeline(_cfg(tmp_path))
    out = tmp_path / "run"
    assert seen["models"] == ["base", "lora", "dpo", "hsft", "control"]
    assert seen["started_from"] == {"base": None, "lora": model_dir(out / "base"), "dpo": model_dir(out / "lora"),
                                    "hsft": model_dir(out / "dpo"), "control": model_dir(out / "dpo")}
    assert seen["variants"] == {"control": "hsft"}


def test_a_variant_is_never_the_start_of_a_later_run(fake_stages, tmp_path):
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora", "dpo", "mining", "hsft", "control")))
    fake_stages.clear()
    pipeline.run_pipeline(_cfg(tmp_path, stages=("eval",)))
    assert fake_stages == [("eval", model_dir(tmp_path / "run" / "hsft"))]


def test_a_later_stage_alone_starts_from_the_finished_stage_before_it(fake_stages, tmp_path):
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora")))
    fake_stages.clear()
    pipeline.run_pipeline(_cfg(tmp_path, stages=("mining", "hsft")))
    assert fake_stages == [("mining", model_dir(tmp_path / "run" / "lora")),
                           ("hsft", model_dir(tmp_path / "run" / "lora"))]


def test_an_output_directory_with_stage_output_needs_resume_or_overwrite(fake_stages, tmp_path):
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base",)))
    with pytest.raises(pipeline.PipelineError, match="--resume.*--overwrite"):
        pipeline.run_pipeline(_cfg(tmp_path, stages=("base",)))
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base",), overwrite=True))


def test_every_variant_sits_beside_hsft_and_is_evaluated_without_being_passed_on(monkeypatch, fake_stages, tmp_path):
    seen = {}

    def record(ctx, cfg, start):
        seen.update(models=[name for name, _ in ctx.models], started_from=dict(ctx.started_from),
                    variants=dict(ctx.variants), start=start)
        return StageResult()

    monkeypatch.setitem(pipeline.STAGE_BY_NAME, "eval", dataclasses.replace(pipeline.STAGE_BY_NAME["eval"], run=record))
    pipeline.run_pipeline(_cfg(tmp_path, stages=STAGE_ORDER))
    out = tmp_path / "run"
    variants = ["control", "all_data", "curriculum", "anti_curriculum", "loss_weighted", "iterative"]
    assert seen["models"] == ["base", "lora", "dpo", "hsft", *variants]
    assert all(seen["started_from"][v] == model_dir(out / "dpo") for v in variants)
    assert seen["variants"] == {v: "hsft" for v in variants} and seen["start"] == model_dir(out / "hsft")
