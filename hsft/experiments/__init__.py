"""The study behind the method, re-run on the user's data and model with one command
(launch/experiments.py): the suites (hsft.experiments.suites), the runner that runs and resumes them
(hsft.experiments.runner), the tables with their statistics and verdicts (hsft.experiments.results) and
the plots (hsft.experiments.plots)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["main"]


def main(cfg, suite: str, seeds: list[int], output_dir: Path, reference: Path | None = None, *,
         shared_stage0: bool = False) -> int:
    """Run the suite; bad input ends with one clear line (HSFT_DEBUG=1 shows the traceback)."""
    from hsft.experiments.runner import run_suite
    from hsft.pipeline import exit_code

    return exit_code("experiments", lambda: run_suite(cfg, suite, seeds, output_dir, reference=reference,
                                                      shared_stage0=shared_stage0,
                                                      verbose=cfg.verbose))
