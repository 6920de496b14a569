"""The two-path evaluator: discrepancy on a model whose generation equals the training response,
misses on a model that never emits [SEG], agreement with hsft.metrics, reports, ranks, statistics."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hsft import metrics
from hsft.config import EvalConfig
from hsft.data import Sample, make_fundus
from hsft.engine.tensorboard import TBWriter
from hsft.eval import compare_summaries, evaluate_model, paired_bootstrap
from hsft.eval import evaluator as evaluator_module
from hsft.eval.compare import categorise
from hsft.eval.statistics import label_flips
from hsft.model.chat import IGNORE_INDEX
from hsft.ops import upsample_masks

from forcing import ForceTokens, ForbidToken


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    # Different sizes (odd ones included) so that "original resolution" is really exercised.
    generated = [make_fundus(seed, size) for seed, size in ((0, 64), (1, 80), (2, 96), (3, 72))]
    odd = make_fundus(4, 75)
    crop = Sample(id="odd_crop", image=odd.image[:67, :75].copy(), mask=odd.mask[:67, :75].copy(),
                  fov=odd.fov[:67, :75].copy(), source="test:crop")
    return generated + [crop]


@pytest.fixture(scope="module")
def response_forcer(model) -> ForceTokens:
    tokens = model.tokenize(1, form="response")
    response_ids = tokens.input_ids[0][tokens.labels[0] != IGNORE_INDEX].tolist()  # answer + end token
    return ForceTokens(model.tokenize(1, form="generate").input_ids.shape[1], response_ids)


@pytest.fixture(scope="module")
def forced_run(model, samples, response_forcer, tmp_path_factory):
    out = tmp_path_factory.mktemp("forced")
    cfg = EvalConfig(batch_size=3, overlays=2, fixed_overlays=1, bootstrap_resamples=500)
    tb_dir = out / "tb"
    tb = TBWriter(tb_dir)
    summary = evaluate_model(model, samples, cfg, out_dir=out, tb=tb, step=7, tag="eval/test",
                             logits_processor=response_forcer)
    tb.close()
    return summary, out, tb_dir


def test_generation_equal_to_training_response_shows_no_discrepancy(forced_run, model):
    summary, _, _ = forced_run
    n = summary["n"]
    assert n == 5 and summary["generate"]["seg_rate"] == 1.0 and summary["generate"]["misses"] == 0
    assert summary["generate"]["texts"][0] == {"text": model.prompt.response, "count": n}
    pair = summary["discrepancy"]["pairs"]["forward"]
    assert pair["cosine_hidden"]["n"] == n
    assert pair["cosine_hidden"]["min"] > 0.9999 and pair["cosine_embedding"]["min"] > 0.9999
    assert pair["mask_agreement_dice"]["min"] > 0.999
    for row in summary["samples"]:
        assert row["scores"]["generate"]["dice"] == pytest.approx(row["scores"]["forward"]["dice"], abs=1e-4)
    assert summary["paths"]["generate"]["dice"] == pytest.approx(summary["paths"]["forward"]["dice"], abs=1e-4)
    assert abs(pair["dice_difference"]["mean"]) < 1e-4 and pair["flips"] == []
    # The [SEG]-in-prompt form is a different input: its state is close but not identical.
    assert summary["discrepancy"]["pairs"]["prompt"]["cosine_hidden"]["mean"] < 0.99999


def test_evaluator_dice_equals_hsft_metrics_on_the_same_masks(model, samples, response_forcer, forced_run):
    summary, _, _ = forced_run
    generated = model.generate_seg(model.preprocess([s.image for s in samples]), logits_processor=[response_forcer])
    forward = model.forward_seg(model.preprocess([s.image for s in samples]), model.tokenize(len(samples)))
    for i, sample in enumerate(samples):
        row = summary["samples"][i]
        assert row["id"] == sample.id and (row["height"], row["width"]) == sample.size
        target = torch.from_numpy(sample.mask)[None]
        fov = torch.from_numpy(sample.fov)[None]
        for path, logits in (("generate", generated.mask_logits), ("forward", forward.mask_logits)):
            pred = upsample_masks(logits[i:i + 1].detach().float(), sample.size, threshold=0.0)
            expected = metrics.per_image_metrics(metrics.counts_from_masks(pred, target, fov))
            for name in ("dice", "iou", "sensitivity", "specificity", "precision"):
                assert row["scores"][path][name] == pytest.approx(float(expected[name][0]), abs=1e-6), (path, name)
            # FOV-aware: pixels outside the FOV are not counted.
            counts = row["scores"][path]
            assert counts["tp"] + counts["fp"] + counts["fn"] + counts["tn"] == int(sample.fov.sum())


def test_report_files(forced_run):
    summary, out, tb_dir = forced_run
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(summary))
    with open(out / "per_sample.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [s["id"] for s in summary["samples"]]
    for row, sample in zip(rows, summary["samples"]):
        assert float(row["generate_dice"]) == pytest.approx(sample["scores"]["generate"]["dice"], abs=1e-6)
        assert float(row["delta_generate_minus_forward"]) == pytest.approx(
            sample["scores"]["generate"]["dice"] - sample["scores"]["forward"]["dice"], abs=1e-6)
    text = (out / "eval.md").read_text()
    for heading in ("## Summary", "## Discrepancy", "## Per sample", "## Overlays"):
        assert heading in text
    assert all(s["id"] in text for s in summary["samples"])
    # Worst two by generate Dice, then the fixed first sample.
    worst = sorted(summary["samples"], key=lambda r: (r["scores"]["generate"]["dice"], r["index"]))[:2]
    names = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert names == sorted([f"worst_01_{worst[0]['id']}.png", f"worst_02_{worst[1]['id']}.png",
                            f"fixed_01_{summary['samples'][0]['id']}.png"])
    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"eval/test/overlay/worst_01", "eval/test/overlay/worst_02",
            f"eval/test/overlay/fixed/{summary['samples'][0]['id']}"} <= set(tags["images"])
    assert "eval/test/dice_histogram/generate" in tags["histograms"]
    logged = events.Scalars("eval/test/generate/dice")[0]
    assert logged.step == 7 and logged.value == pytest.approx(summary["paths"]["generate"]["dice"], rel=1e-6)


def test_forbidden_seg_counts_misses_as_empty_masks(model, samples):
    empty = Sample(id="no_vessels", image=samples[0].image.copy(), mask=np.zeros(samples[0].size, dtype=bool),
                   fov=None, source="test:empty")
    cases = samples[:2] + [empty]
    cfg = EvalConfig(batch_size=2, overlays=0, fixed_overlays=0, bootstrap_resamples=200)
    summary = evaluate_model(model, cases, cfg, out_dir=None, logits_processor=ForbidToken(model.seg_token_id))
    assert summary["generate"]["misses"] == 3 and summary["generate"]["seg_rate"] == 0.0
    assert summary["generate"]["miss_ids"] == [c.id for c in cases]
    rows = {r["id"]: r for r in summary["samples"]}
    for case in cases[:2]:
        assert rows[case.id]["scores"]["generate"]["dice"] < 1e-6
        assert rows[case.id]["scores"]["generate"]["tp"] + rows[case.id]["scores"]["generate"]["fp"] == 0
        assert rows[case.id]["cosine_hidden"]["forward"] is None
    # Empty prediction on an empty ground truth is perfect agreement (the metrics' convention);
    # without a FOV every pixel counts.
    assert rows["no_vessels"]["scores"]["generate"]["dice"] == 1.0
    assert rows["no_vessels"]["scores"]["generate"]["tn"] == empty.mask.size
    assert summary["discrepancy"]["pairs"]["forward"]["cosine_hidden"]["n"] == 0
    assert summary["paths"]["generate"]["dice"] == pytest.approx(1.0 / 3, abs=1e-6)


def test_two_ranks_give_the_single_rank_summary(model, samples, response_forcer, monkeypatch, tmp_path):
    cfg = EvalConfig(batch_size=2, overlays=1, fixed_overlays=0, bootstrap_resamples=200)
    single = evaluate_model(model, samples, cfg, out_dir=None, logits_processor=response_forcer)

    dist = evaluator_module.distributed
    shards: dict[int, list] = {}
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    # Rank 1 first: its gather hands back only its own part, which rank 0's gather then merges.
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "is_main", lambda: False)

    def gather_on_rank1(obj):
        shards[1] = obj
        return [[], obj]  # rank 0's part is missing here: the evaluator must notice

    monkeypatch.setattr(evaluator_module.distributed, "all_gather_objects", gather_on_rank1)
    with pytest.raises(RuntimeError, match="gathered"):
        evaluate_model(model, samples, cfg, out_dir=tmp_path / "rank1", logits_processor=response_forcer)
    assert not (tmp_path / "rank1").exists()
    assert sorted(r.index for r in shards[1]) == [1, 3]

    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "is_main", lambda: True)
    monkeypatch.setattr(evaluator_module.distributed, "all_gather_objects", lambda obj: [obj, shards[1]])
    merged = evaluate_model(model, samples, cfg, out_dir=tmp_path / "rank0", logits_processor=response_forcer)
    assert (tmp_path / "rank0" / "eval.json").is_file()
    assert [r["id"] for r in merged["samples"]] == [r["id"] for r in single["samples"]]
    for a, b in zip(merged["samples"], single["samples"]):
        for path in ("forward", "prompt", "generate"):
            assert a["scores"][path]["dice"] == pytest.approx(b["scores"][path]["dice"], abs=1e-6)
    assert merged["paths"]["generate"]["dice"] == pytest.approx(single["paths"]["generate"]["dice"], abs=1e-6)


def test_bad_sample_lists_are_refused(model, samples):
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, [], EvalConfig(), out_dir=None)
    with pytest.raises(ValueError, match="unique.*" + samples[0].id):
        evaluate_model(model, [samples[0], samples[0]], EvalConfig(), out_dir=None)
    with pytest.raises(ValueError, match="eval.tau"):
        evaluate_model(model, samples, EvalConfig(tau=1.5), out_dir=None)


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    before = rng.uniform(0.4, 0.9, size=40)
    shifted = paired_bootstrap(before, before + 0.05, resamples=300, seed=3)
    # A constant paired difference has no spread, however the pairs are resampled.
    assert shifted["mean"] == pytest.approx(0.05) and shifted["low"] == pytest.approx(0.05)
    assert shifted["high"] == pytest.approx(0.05)

    after = before + rng.normal(0.02, 0.05, size=40)
    first = paired_bootstrap(before, after, resamples=2000, seed=0)
    assert first == paired_bootstrap(before, after, resamples=2000, seed=0)
    assert first["low"] < first["mean"] < first["high"]
    assert first["mean"] == pytest.approx(float(np.mean(after - before)))
    # The interval's width is about 2 * 1.96 standard errors of the mean difference.
    standard_error = np.std(after - before) / math.sqrt(40)
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.2)
    assert paired_bootstrap([], [])["mean"] is None
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([0.1, 0.2], [0.3])


def test_label_flips_and_categories():
    flips = label_flips(["a", "b", "c", "d"], [0.8, 0.7, 0.75, 0.2], [0.7, 0.8, 0.75, 0.3], tau=0.75)
    assert [(f["id"], f["first"], f["second"]) for f in flips] == [("a", "easy", "hard"), ("b", "hard", "easy")]
    assert categorise(0.75, 0.80, tau=0.75, tolerance=0.01) == ("Easy", "Better")
    assert categorise(0.74, 0.735, tau=0.75, tolerance=0.01) == ("Hard", "Stable")
    assert categorise(0.5, 0.4, tau=0.75, tolerance=0.01) == ("Hard", "Worse")
    assert categorise(0.9, 0.9 - 0.01, tau=0.75, tolerance=0.01) == ("Easy", "Stable")


def test_compare_summaries(forced_run):
    summary, _, _ = forced_run
    after = json.loads(json.dumps(summary))
    after["samples"][0]["scores"]["generate"]["dice"] += 0.2
    after["samples"][1]["scores"]["generate"]["dice"] -= 0.05
    comparison = compare_summaries(summary, after, tau=0.75, tolerance=0.01, resamples=200)
    rows = {r["id"]: r for r in comparison["rows"]}
    first, second = summary["samples"][0]["id"], summary["samples"][1]["id"]
    assert rows[first]["category"] == "Hard -> Better" and rows[first]["delta"] == pytest.approx(0.2)
    assert rows[second]["category"] == "Hard -> Worse"
    assert comparison["counts"]["Hard"] == {"Better": 1, "Stable": summary["n"] - 2, "Worse": 1}
    assert comparison["delta"]["mean"] == pytest.approx(0.15 / summary["n"])
    after["samples"] = after["samples"][1:]
    with pytest.raises(ValueError, match="different samples"):
        compare_summaries(summary, after, tau=0.75, tolerance=0.01)


def test_the_three_paths_share_one_image_encoding_and_match_their_own(model, samples, response_forcer, monkeypatch):
    """run_paths encodes each batch's images once for the three paths; each path's masks equal the
    ones it computes with its own encoding."""
    import torch

    from hsft.eval.seg_paths import run_paths

    model.eval()
    images = [s.image for s in samples[:3]]
    calls = []
    encode = model.sam_features
    monkeypatch.setattr(model, "sam_features", lambda pixels: calls.append(1) or encode(pixels))
    shared = run_paths(model, images, max_new_tokens=8, logits_processor=response_forcer)
    assert len(calls) == 1
    monkeypatch.undo()
    batch = model.preprocess(images).to(dtype=model.dtype)
    with torch.no_grad():
        for path, form in (("forward", "response"), ("prompt", "prompt")):
            own = model.forward_seg(batch, model.tokenize(3, form=form)).mask_logits
            assert torch.equal(shared.mask_logits[path], own), path
        own = model.generate_seg(batch, max_new_tokens=8, logits_processor=[response_forcer]).mask_logits
    assert torch.equal(shared.mask_logits["generate"], own)
