"""Running a module in eval mode for a while (inference, a measurement at an epoch end) and giving it back
in the mode it was in: a training loop that measures its model mid-run must find it still training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """`module` in eval mode (dropout off) inside the block, back in its previous mode after it, also when
    the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
