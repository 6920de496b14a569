"""chunks: consecutive batches, in order, the last one shorter."""

from __future__ import annotations

import pytest

from hsft.data.batches import chunks


def test_chunks_cover_the_sequence_in_order_with_a_short_last_one():
    assert [list(c) for c in chunks(range(7), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks(["a", "b"], 2)) == [["a", "b"]] and list(chunks([], 4)) == []
    with pytest.raises(ValueError, match="size must be >= 1"):
        list(chunks([1], 0))
