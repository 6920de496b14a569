"""The main command (launch/hsft.py) with a probe on resume, for tests run under the DeepSpeed launcher.

Right after a stage's checkpoint is loaded, every rank writes what its engine then holds (the module's
trainable weights, its slice of the fp32 master weights and AdamW moments, the scheduler) as a plain
DeepSpeed checkpoint into $HSFT_PROBE_DIR/loaded, and training goes on unchanged. A test compares it
with the checkpoint that was loaded, whatever number of ranks wrote either.

    deepspeed --num_gpus 2 tests/resume_probe.py <launch/hsft.py arguments> --resume
"""

import os
import runpy
import sys

from launch_scripts import LAUNCH  # beside this script, which is sys.path[0]

sys.path.insert(0, str(LAUNCH))  # launch/hsft.py imports its sibling _import_hsft

from hsft.engine import checkpoint  # noqa: E402

_load = checkpoint.load


def _load_and_probe(engine, point):
    client_state = _load(engine, point)
    engine.save_checkpoint(os.environ["HSFT_PROBE_DIR"], tag="loaded", save_latest=False,
                           exclude_frozen_parameters=True)
    return client_state


checkpoint.load = _load_and_probe  # the loop looks it up on the module at every resume
sys.argv = [str(LAUNCH / "hsft.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
