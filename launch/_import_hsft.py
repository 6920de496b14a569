"""Imported first by every launch script, so that `import hsft` finds the package.

Run as `python launch/x.py` (or under the deepspeed launcher), a script's own directory is
sys.path[0], and launch/hsft.py there would shadow the hsft package; this drops the directory.
"""

import sys
from pathlib import Path

_LAUNCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _LAUNCH_DIR]
