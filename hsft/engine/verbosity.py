"""How much the libraries under the loop say: their warnings by default, everything with --verbose.

DeepSpeed's and transformers' informational logs (engine set-up, configuration dumps, checkpoint
consolidation) repeat on every stage and every rank; a run's own lines say what happened. `quiet_stdout`
hides what a library prints with print() rather than its logger (DeepSpeed's "Processing zero
checkpoint ..."), unless verbose.
"""

from __future__ import annotations

import contextlib
import io
import logging

__all__ = ["set_verbosity", "is_verbose", "quiet_stdout"]

_verbose = False


def set_verbosity(verbose: bool, *, deepspeed: bool = True) -> None:
    """Set the libraries' log level; `deepspeed=False` for commands that never start DeepSpeed (evaluate,
    predict), which then do not pay for importing it."""
    global _verbose
    _verbose = bool(verbose)
    level = logging.INFO if verbose else logging.WARNING
    if deepspeed:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(level)
        for handler in ds_logger.handlers:
            handler.setLevel(level)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)
    # transformers draws a progress bar for every model it loads (a run loads dozens of small ones).
    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def is_verbose() -> bool:
    return _verbose


@contextlib.contextmanager
def quiet_stdout():
    """Swallow what the enclosed library calls print, unless verbose."""
    if _verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
