"""Loading a launch/ script's main() in-process (the scripts are files, not an importable package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def launch_main(name: str):
    """main(argv) of launch/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}_script", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
