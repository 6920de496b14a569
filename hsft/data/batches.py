"""Consecutive batches of a sequence: how every pass over samples, pairs or files takes them a few at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items[0:size]`, `items[size:2 * size]`, ... in order, the last one shorter when `size` does not
    divide the length (slices of a range are ranges, of a list lists)."""
    if size < 1:
        raise ValueError(f"chunks: size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
