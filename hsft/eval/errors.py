"""The error the evaluation and prediction commands raise for unusable input (a checkpoint
directory, an image file, an argument); its message names the file or argument and the problem."""

from __future__ import annotations

from hsft.errors import BadValue

__all__ = ["InputError"]


class InputError(BadValue):
    pass
