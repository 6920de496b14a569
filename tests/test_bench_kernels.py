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
    assert "| cpu | 2x8->32 | eager | fwd |" in kernels.format_table(rows)


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
