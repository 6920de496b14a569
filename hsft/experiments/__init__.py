"""The study behind the method, re-run on the user's data and model with one command
(launch/experiments.py): the suites (hsft.experiments.suites), the runner that runs and resumes them
(hsft.experiments.runner), the tables with their statistics and verdicts (hsft.experiments.results) and
the plots (hsft.experiments.plots)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["main"]


def main(cfg, suite: str, seeds: list[int], output_dir: Path, reference: Path | None = None) -> int:
    """Run the suite; bad input ends with one clear line (HSFT_DEBUG=1 shows the traceback)."""
    from hsft.engine.ds_config import DeepSpeedConfigError
    from hsft.engine.loop import NonFiniteTrainingError
    from hsft.engine.output_lock import OutputDirInUse
    from hsft.experiments.runner import run_suite
    from hsft.pipeline import PipelineError

    try:
        run_suite(cfg, suite, seeds, output_dir, reference=reference)
    except NonFiniteTrainingError as err:
        print(f"experiments: stopped: {err}", file=sys.stderr)
        return 3
    except (PipelineError, DeepSpeedConfigError, OutputDirInUse, ValueError, FileNotFoundError) as err:
        if os.environ.get("HSFT_DEBUG"):
            raise
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    return 0
