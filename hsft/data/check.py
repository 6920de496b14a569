"""`launch/data.py check`: scan a dataset, summarise it and list every problem found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hsft.data.layouts import SPLITS
from hsft.data.sample import DatasetError
from hsft.data.scan import SplitScan, inspect_split

__all__ = ["SplitSummary", "CheckReport", "check_dataset"]

# A vessel mask covering more of the FOV than this is almost certainly inverted.
_INVERTED_FRACTION = 0.5


@dataclass
class SplitSummary:
    split: str
    count: int
    sizes: Counter  # (width, height) -> number of images
    vessel_fractions: list[float]


@dataclass
class CheckReport:
    format: str
    root: Path
    fov_note: str = ""
    splits: list[SplitSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self, max_ignored: int = 5) -> str:
        lines = [f"{self.format} dataset at {self.root}", f"  FOV: {self.fov_note}"]
        for summary in self.splits:
            sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(summary.sizes.items())) or "-"
            if summary.vessel_fractions:
                fractions = np.asarray(summary.vessel_fractions)
                vessel = (f"vessel fraction in FOV: mean {fractions.mean():.3f}, "
                          f"min {fractions.min():.3f}, max {fractions.max():.3f}")
            else:
                vessel = "vessel fraction in FOV: -"
            lines.append(f"  {summary.split}: {summary.count} images; sizes (WxH) {sizes}; {vessel}")
        if self.ignored:
            shown = ", ".join(str(p) for p in self.ignored[:max_ignored])
            more = f" and {len(self.ignored) - max_ignored} more" if len(self.ignored) > max_ignored else ""
            lines.append(f"  ignored {len(self.ignored)} file(s) outside the layout: {shown}{more}")
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines.extend(f"  {problem}" for problem in self.problems)
            lines.append("FAILED")
        else:
            lines.append("OK")
        return "\n".join(lines)


def _summarise(scan: SplitScan, report: CheckReport) -> SplitSummary:
    sizes = Counter((ref.width, ref.height) for ref in scan.refs)
    fractions = []
    for ref in scan.refs:
        try:
            sample = ref.load()
        except DatasetError as error:
            report.problems.extend(error.problems)
            continue
        fraction = sample.vessel_fraction()
        fractions.append(fraction)
        if not sample.mask.any():
            report.warnings.append(f"{ref.mask_path}: vessel mask is empty")
        elif fraction > _INVERTED_FRACTION:
            report.warnings.append(
                f"{ref.mask_path}: vessels cover {fraction:.0%} of the FOV; is the mask inverted?"
            )
    return SplitSummary(scan.split, len(scan.refs), sizes, fractions)


def check_dataset(format: str, root: str | Path | None) -> CheckReport:
    """Scan both splits, decode every sample and collect all problems (never stops at the first).

    Raises DatasetError only when nothing can be scanned (unknown format, missing root).
    """
    scans = [inspect_split(format, root, split) for split in SPLITS]
    report = CheckReport(format=format, root=scans[0].root, fov_note=scans[0].fov_note)
    for scan in scans:
        report.problems.extend(scan.problems)
        report.ignored.extend(scan.ignored)
        report.splits.append(_summarise(scan, report))
    seen: dict[str, Path] = {}
    for scan in scans:
        for ref in scan.refs:
            if scan.split == "test" and ref.id in seen:
                report.problems.append(
                    f"{ref.image_path}: sample id {ref.id!r} is also in the train split ({seen[ref.id]}); "
                    "the test split must be held out"
                )
            elif scan.split == "train":
                seen[ref.id] = ref.image_path
    report.problems = list(dict.fromkeys(report.problems))
    report.warnings = list(dict.fromkeys(report.warnings))
    report.ignored = list(dict.fromkeys(report.ignored))
    return report
