"""report.md rendered from the stages' data: every training stage has its lines, a result read back from
stage_result.json (a resumed run) renders as the one the stage returned, and the held-out section shows
each variant against the stage it sits beside."""

from __future__ import annotations

from hsft import pipeline
from hsft.config import DataConfig, RunConfig
from hsft.stages import report
from hsft.stages.training import StageResult


def _fine_tune_summary() -> dict:
    return {"samples": 4, "pool": 4, "training_set": "the mined hard set", "cache": True, "seg_form": "response",
            "trains": "text_hidden_fcs", "hard_set": 4, "optimizer_steps": 6, "hard_set_loss_before": 0.5,
            "hard_set_loss_by_epoch": {1: 0.45, 2: 0.4, 3: 0.375}, "hard_set_loss_after": 0.375}


def test_every_stage_that_trains_has_its_lines_in_the_report():
    missing = [s.name for s in pipeline.STAGES if (s.trains or s.name == "unet") and s.name not in report.NOTES]
    assert missing == []
    assert {"mining", "eval"} <= set(report.SECTIONS)


def test_a_result_read_back_from_its_stage_directory_renders_as_the_one_returned(tmp_path):
    result = StageResult(model_dir=tmp_path / "model", summary=_fine_tune_summary(), global_step=12)
    pipeline.save_stage_result(tmp_path, result)
    loaded = pipeline.load_stage_result(tmp_path)
    assert loaded.global_step == 12 and loaded.model_dir == tmp_path / "model"
    # JSON turns the epochs into strings: the lines must not change with it.
    assert report.stage_notes("control", loaded.summary) == report.stage_notes("control", result.summary)
    note, evidence = report.stage_notes("control", result.summary)
    assert note.startswith("- Control: 4 samples an epoch (the mined hard set)")
    assert evidence == ("  - 6 optimizer steps; loss over the hard set (4 samples): 0.5000 before, "
                        "0.4500 after epoch 1, 0.3750 after epoch 3")
    skipped = {**_fine_tune_summary(), "skipped": True}
    assert report.stage_notes("hsft", skipped) == [report.stage_notes("hsft", result.summary)[0]
                                                   + " -- skipped: empty hard set"]


def test_the_held_out_section_compares_each_variant_with_the_stage_beside_it():
    effect = {"mean": 0.02, "low": -0.01, "high": 0.05}
    row = {"dice": 0.6, "iou": 0.4, "forward_dice": 0.6, "seg_rate": 1.0, "n": 3, "delta_base": 0.0,
           "split": "test", "effect": None, "beside_effect": None, "beside": None, "started_from": None}
    rows = [{**row, "stage": "hsft"}, {**row, "stage": "control", "beside": "hsft", "beside_effect": effect}]
    cfg = RunConfig(data=DataConfig(format="drive", root="/data"))
    text = "\n".join(report.stage_section("eval", rows, cfg))
    assert "Split: official test split (3 images of drive)." in text
    assert "hsft - control (same starting model, same steps; what differs is the training set): " \
           "+0.0200 [-0.0100, +0.0500]" in text
    assert text.count(" - control (") == 1
