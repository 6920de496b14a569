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
from hsft.stages import report as renderer
from hsft.stages.training import StageResult, model_dir


def test_the_table_lists_every_stage_once_with_the_common_entry():
    assert tuple(stage.name for stage in pipeline.STAGES) == STAGE_ORDER
    hints = typing.get_type_hints(RunConfig)
    for stage in pipeline.STAGES:
        assert stage.config in hints, f"{stage.name}: RunConfig has no field {stage.config!r}"
        params = list(inspect.signature(stage.run).parameters)
        # What else a stage needs (the run's models, another stage's settings) is handed to it by name.
        assert params == ["ctx", "cfg", "start", *stage.inputs], f"{stage.name}.run takes {params}"
        for name in stage.inputs:
            if name != "models":
                assert typing.get_type_hints(stage.run)[name] is hints[name], f"{stage.name}.run's {name}"
        cfg_type = typing.get_type_hints(stage.run)["cfg"]
        assert cfg_type is hints[stage.config], f"{stage.name}.run takes {cfg_type}, RunConfig.{stage.config} is " \
                                                f"{hints[stage.config]}"


class _Calls(list):
    """(stage, the model it was handed) of every stage run, in order; `steps`: (stage, the run-wide step
    it was handed)."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[str, int]] = []

    def clear(self):
        super().clear()
        self.steps.clear()


@pytest.fixture
def fake_stages(monkeypatch, tiny_model):
    """Every stage replaced by a fake that records the model it was handed; training stages write a
    model directory and a metrics.json like the real ones."""
    calls = _Calls()
    steps = calls.steps

    def fake(name: str, trains: bool):
        def run(ctx, cfg, start, **inputs):
            calls.append((name, start))
            steps.append((name, ctx.global_step))
            if not trains:
                return StageResult(summary={"ran": name})
            stage_dir = ctx.stage_dir(name)
            save_model(tiny_model, model_dir(stage_dir))
            end = ctx.global_step + 10
            write_json(stage_dir / "metrics.json", {"stage": name, "global_step_end": end})
            return StageResult(model_dir=model_dir(stage_dir), summary={"ran": name}, global_step=end)
        return run

    for stage in pipeline.STAGES:
        monkeypatch.setitem(pipeline.STAGE_BY_NAME, stage.name,
                            dataclasses.replace(stage, run=fake(stage.name, stage.trains)))
        # The renderer draws each fake's part from its summary: a section for the stages that train
        # nothing, a note for the others.
        if stage.trains:
            monkeypatch.setitem(renderer.NOTES, stage.name, lambda name, summary: [f"- note of {summary.get('ran')}"])
            monkeypatch.delitem(renderer.SECTIONS, stage.name, raising=False)
        else:
            monkeypatch.setitem(renderer.SECTIONS, stage.name,
                                lambda summary, cfg: [f"## section of {summary.get('ran')}", ""])
            monkeypatch.delitem(renderer.NOTES, stage.name, raising=False)
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
    cfg = _cfg(tmp_path, stages=("base", "lora", "dpo", "mining", "hsft"))
    pipeline.run_pipeline(cfg)
    (tmp_path / "run" / "hsft" / "metrics.json").unlink()  # HSFT did not finish
    fake_stages.clear()
    report = pipeline.run_pipeline(dataclasses.replace(cfg, stages=cfg.stages + ("eval",), resume=True))
    # base, lora, dpo and mining finished: only HSFT and the new eval stage run
    assert [name for name, _ in fake_stages] == ["hsft", "eval"]
    assert dict(fake_stages)["hsft"] == model_dir(tmp_path / "run" / "dpo")
    # The step continues from the skipped stages' saved results (each fake trains 10 steps).
    assert fake_stages.steps == [("hsft", 30), ("eval", 40)]
    # The report holds every stage, the finished ones from their saved results.
    assert all(report[name] == {"ran": name} for name in ("base", "lora", "dpo", "mining", "hsft"))
    assert "lora model" in report["written"]
    text = (tmp_path / "run" / "report.md").read_text()
    assert all(f"- note of {name}" in text for name in ("base", "lora", "dpo", "hsft"))


def test_resuming_a_finished_run_changes_nothing_and_prints_its_report(fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(_cfg(tmp_path))
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".hsft.lock"}
    printed = capsys.readouterr().out
    # The run's first line (after what libraries log on import) names the recipe, precision, device and ranks.
    assert printed.index(f"hsft: recipe none, fp32 on cpu, 1 rank(s); output {out}\n") < printed.index("data: ")
    summary = printed[printed.index("# hsft run report"):]
    fake_stages.clear()
    report = pipeline.run_pipeline(_cfg(tmp_path, resume=True))
    assert fake_stages == []
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".hsft.lock"}
    assert after == before
    assert report == json.loads((out / "report.json").read_text())
    assert capsys.readouterr().out.endswith(summary)  # the same report as the run printed


def test_the_console_shows_the_results_and_the_next_model_and_points_to_the_report():
    report_md = "# hsft run report\n\nRecipe: tiny\n\n## Held-out results\n\n| table |\n\n## Hard-sample mining\n\n" \
                "| buckets |\n\n## Stages\n\n- notes\n\n## The model to use next\n\n`m`\n"
    shown = renderer.console_summary(report_md, pipeline.Path("out"))
    assert "| table |" in shown and "`m`" in shown and "Recipe: tiny" in shown
    assert "buckets" not in shown and "- notes" not in shown
    assert shown.rstrip().endswith("The whole report: out/report.md")


@pytest.mark.parametrize("changes, named", [({"seed": 2}, "seed (run: 0, now: 2)"),
                                            ({"recipe": "tiny"}, "recipe (run: None, now: 'tiny')"),
                                            ({"hsft.train.lr": 0.5}, "hsft.train.lr")])
def test_resume_with_other_settings_is_refused_before_anything_is_written(fake_stages, tmp_path, changes, named):
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora")))
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fake_stages.clear()
    with pytest.raises(pipeline.PipelineError, match="--resume") as info:
        pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora", "dpo"), resume=True, **changes))
    assert named in str(info.value) and "\n" not in str(info.value)
    assert fake_stages == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Settings that do not change results may differ.
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora", "dpo"), resume=True, keep_checkpoints=3))
    assert [name for name, _ in fake_stages] == ["dpo"]


def test_the_report_ends_with_the_model_to_use_next(fake_stages, tmp_path):
    report = pipeline.run_pipeline(_cfg(tmp_path))
    out = tmp_path / "run"
    assert report["final_model"] == str(model_dir(out / "hsft"))  # the control beside HSFT is not handed on
    tail = (out / "report.md").read_text().split("## The model to use next")[1]
    assert str(model_dir(out / "hsft")) in tail and "launch/predict.py --checkpoint" in tail
    assert "synthetic" in tail  # the embedded default says what it is
    record = json.loads((model_dir(out / "lora") / "training.json").read_text())
    assert record == {"recipe": None, "precision": "fp32", "embedded_default": True, "stage": "lora"}


def test_the_models_to_evaluate_and_what_each_started_from(monkeypatch, fake_stages, tmp_path):
    seen = {}

    def record(ctx, cfg, start, models, mining):
        seen.update(models=[m.label for m in models], started_from={m.label: m.started_from for m in models},
                    variants={m.label: m.beside for m in models if m.beside}, mining=mining)
        return StageResult()

    monkeypatch.setitem(pipeline.STAGE_BY_NAME, "eval", dataclasses.replace(pipeline.STAGE_BY_NAME["eval"], run=record))
    pipeline.run_pipeline(_cfg(tmp_path))
    out = tmp_path / "run"
    assert seen["models"] == ["base", "lora", "dpo", "hsft", "control"]
    assert seen["started_from"] == {"base": None, "lora": model_dir(out / "base"), "dpo": model_dir(out / "lora"),
                                    "hsft": model_dir(out / "dpo"), "control": model_dir(out / "dpo")}
    assert seen["variants"] == {"control": "hsft"}
    assert seen["mining"] == _cfg(tmp_path).mining  # the mining stage's settings, handed to it


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
    assert fake_stages.steps == [("mining", 20), ("hsft", 20)]  # continued from lora's end


def test_an_output_directory_with_stage_output_needs_resume_or_overwrite(fake_stages, tmp_path):
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base",)))
    with pytest.raises(pipeline.PipelineError, match="--resume.*--overwrite"):
        pipeline.run_pipeline(_cfg(tmp_path, stages=("base",)))
    pipeline.run_pipeline(_cfg(tmp_path, stages=("base",), overwrite=True))


def test_every_variant_sits_beside_hsft_and_is_evaluated_without_being_passed_on(monkeypatch, fake_stages, tmp_path):
    seen = {}

    def record(ctx, cfg, start, models, mining):
        seen.update(models=[m.label for m in models], started_from={m.label: m.started_from for m in models},
                    variants={m.label: m.beside for m in models if m.beside}, start=start)
        return StageResult()

    monkeypatch.setitem(pipeline.STAGE_BY_NAME, "eval", dataclasses.replace(pipeline.STAGE_BY_NAME["eval"], run=record))
    pipeline.run_pipeline(_cfg(tmp_path, stages=STAGE_ORDER))
    out = tmp_path / "run"
    variants = [stage.name for stage in pipeline.STAGES if stage.beside == "hsft"]
    assert {"control", "all_data", "curriculum", "anti_curriculum", "loss_weighted", "iterative"} <= set(variants)
    assert seen["models"] == ["base", "lora", "dpo", "hsft", *variants]
    assert all(seen["started_from"][v] == model_dir(out / "dpo") for v in variants)
    assert seen["variants"] == {v: "hsft" for v in variants} and seen["start"] == model_dir(out / "hsft")


def test_model_takes_a_stage_directory_or_its_model(fake_stages, tmp_path):
    from hsft.errors import UserError

    pipeline.run_pipeline(_cfg(tmp_path, stages=("base", "lora")))
    stage = tmp_path / "run" / "lora"
    fake_stages.clear()
    after = dataclasses.replace(_cfg(tmp_path, stages=("dpo",)), output_dir=str(tmp_path / "next"),
                                start_model=str(stage))
    pipeline.run_pipeline(after)
    assert fake_stages == [("dpo", model_dir(stage))]
    with pytest.raises(UserError, match="not an hsft model directory"):
        pipeline.run_pipeline(dataclasses.replace(after, output_dir=str(tmp_path / "other"),
                                                  start_model=str(tmp_path)))
