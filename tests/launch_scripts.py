"""Loading a launch/ script's main() in-process (the scripts are files, not an importable package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def launch_module(name: str):
    """launch/<name>.py as a module, loaded with launch/ on sys.path as `python launch/<name>.py` has it
    (for its `import _import_hsft`), and the path restored afterwards."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}_script", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.path.insert(0, str(LAUNCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def launch_main(name: str):
    """main(argv) of launch/<name>.py (see launch_module)."""
    return launch_module(name).main
