"""The kernel benchmark (hsft.bench.kernels) on a tiny shape: rows, files, the memory roofline table,
and its refusal to label the reference "ours"."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hsft.bench import kernels
from hsft.ops import library

TINY = (kernels.Shape(2, 8, 32),)


def test_rows_and_result_files(tmp_path) -> None:
    providers = ("eager", "ours") if library.has_kernel(torch.device("cpu")) else ("eager",)
    rows = kernels.run(device="cpu", shapes=TINY, providers=providers, modes=("fwd", "fwd+bwd"), repeats=2,
                       warmup=1, log=lambda _: None)
    assert [(r.provider, r.mode) for r in rows] == [(p, m) for p in providers for m in ("fwd", "fwd+bwd")]
    for row in rows:
        assert row.shape == "2x8->32" and row.repeats == 2
        assert 0 < row.min_ms <= row.median_ms <= row.max_ms
        assert row.peak_extra_mib >= 0
        assert row.bandwidth_gbs is None  # the memory roofline is for CUDA devices
    json_path, csv_path = kernels.write_results(rows, tmp_path, command="test")
    payload = json.loads(json_path.read_text())
    assert payload["command"] == "test" and len(payload["rows"]) == len(rows)
    with csv_path.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert "| cpu | float32 | 2x8->32 | eager | fwd |" in kernels.format_table(rows)
    assert all(r.kernel_ms is None and r.launches is None for r in rows)  # profiler counts are for CUDA
    assert rows[0].bytes == kernels.moved_bytes(TINY[0], "fwd", torch.float32)


def test_ours_is_refused_without_the_compiled_kernel(monkeypatch) -> None:
    monkeypatch.setattr(library, "has_kernel", lambda device: False)
    with pytest.raises(kernels.OursUnavailable, match="no compiled hsft kernel for cpu"):
        kernels.run(device="cpu", shapes=TINY, providers=("eager", "ours"), repeats=1, warmup=0, log=lambda _: None)


@pytest.mark.parametrize("name,tbs", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                      ("NVIDIA H200", 4.8), ("NVIDIA H100 NVL", 3.9)])
def test_peak_bandwidth_by_device_name(monkeypatch, name: str, tbs: float) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    bandwidth, source = kernels.peak_bandwidth(torch.device("cuda"))
    assert bandwidth == pytest.approx(tbs * 1e12) and name in source


def test_bfloat16_logits_run_on_cpu() -> None:
    providers = ("eager", "ours") if library.has_kernel(torch.device("cpu")) else ("eager",)
    rows = kernels.run(device="cpu", shapes=TINY, providers=providers, modes=("fwd+bwd",), repeats=1, warmup=0,
                       log=lambda _: None, dtype=torch.bfloat16)
    assert {r.dtype for r in rows} == {"bfloat16"}


def test_bytes_counted() -> None:
    shape = kernels.Shape(16, 256, 1024)
    pixels, low = 16 * 1024 * 1024, 16 * 256 * 256
    assert kernels.moved_bytes(shape, "fwd", torch.float32) == pixels + 4 * low
    assert kernels.moved_bytes(shape, "fwd+bwd", torch.float32) == pixels + 8 * low
    assert kernels.moved_bytes(shape, "fwd+bwd", torch.bfloat16) == pixels + 4 * low
    assert kernels.moved_bytes(shape, "bwd", torch.bfloat16) == 2 * low


def test_launch_summary_counts_device_activities_per_call() -> None:
    activities = [kernels.DeviceActivity("Memset", 1.0), kernels.DeviceActivity("dice_bce_forward_kernel", 9.0),
                  kernels.DeviceActivity("dice_bce_backward_kernel", 2.0)] * 4
    launches, ms = kernels.launch_summary(activities, calls=4)
    assert launches == 3 and ms == pytest.approx(0.012)
    with pytest.raises(ValueError):
        kernels.launch_summary(activities, calls=0)


def test_shape_labels_parse() -> None:
    assert kernels.Shape.parse("16x256->1024") == kernels.Shape(16, 256, 1024)
    with pytest.raises(ValueError, match="is not a shape"):
        kernels.Shape.parse("16x256")


def test_cuda_table_says_which_time_is_which() -> None:
    def row(provider: str, ms: float) -> kernels.Row:
        return kernels.Row("cuda", "16x256->1024", provider, "fwd+bwd", ms, ms, ms, 3, 1.0, gpu_ms=ms * 0.9,
                           kernel_ms=ms * 0.5, launches=3.0, bytes=20_971_520, roofline_fraction=0.1,
                           kernel_roofline=0.2, bandwidth_gbs=100.0)

    table = kernels.format_table([row("eager", 3.0), row("compile", 1.5), row("ours", 0.5)])
    header = table.splitlines()[0]
    for column in ("median ms (whole op)", "events ms", "kernels ms", "launches", "roofline (op)",
                   "roofline (kernels)", "vs compile time"):
        assert column in header
    assert "| ours | fwd+bwd | 0.500 |" in table and "| 6.00x | 3.00x |" in table


def test_targets_are_checked_per_row() -> None:
    def row(provider: str, ms: float, roofline: float | None) -> kernels.Row:
        return kernels.Row("cuda", "16x256->1024", provider, "fwd+bwd", ms, ms, ms, 3, 1.0, dtype="bfloat16",
                           roofline_fraction=roofline)

    good = [row("eager", 3.0, 0.05), row("compile", 1.0, 0.1), row("ours", 0.5, 0.45)]
    ((line, met),) = kernels.check_targets(good)
    assert met and "vs eager 6.00x (target >= 5x) ok" in line and "roofline 45% (target >= 40%) ok" in line
    slow = [row("eager", 3.0, 0.05), row("compile", 0.6, 0.1), row("ours", 0.5, 0.45)]
    ((line, met),) = kernels.check_targets(slow)
    assert not met and "vs compile 1.20x (target >= 1.5x) MISSED" in line
    ((line, met),) = kernels.check_targets([row("ours", 0.5, None)])
    assert not met and "vs eager n/a" in line
