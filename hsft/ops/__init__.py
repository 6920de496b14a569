"""Fused mask ops: Dice+BCE from low-resolution logits, mask upsampling, mask statistics.

The compiled library (``hsft._C``, built by ``pip install --no-build-isolation -e .``) is loaded
on import; without it every op runs the pure-torch reference in :mod:`hsft.ops.reference` and
one warning says how to build. ``HSFT_OPS_LIBRARY=/path/to/_C*.so`` loads a library from
elsewhere. :func:`library_status` tells which is in use.
"""

from __future__ import annotations

from hsft.ops import library as _library
from hsft.ops import registration as _registration
from hsft.ops.library import LibraryStatus, OpsFallbackWarning
from hsft.ops.mask_ops import dice_bce_loss, mask_loss, mask_stats, upsample_masks

__all__ = [
    "dice_bce_loss",
    "mask_loss",
    "upsample_masks",
    "mask_stats",
    "library_status",
    "LibraryStatus",
    "OpsFallbackWarning",
]


def library_status() -> LibraryStatus:
    """Whether the compiled ops are in use, and where they came from (or why not)."""
    return _library.status()


if _library.load().loaded:
    _registration.register()
