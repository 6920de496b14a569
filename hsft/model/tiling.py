"""InternVL's dynamic tiling: how many square tiles an image is cut into for the vision tower.

An image of (W, H) pixels is resized to a grid of `columns x rows` tiles of `tile` pixels each
(`columns * rows` between `min_tiles` and `max_tiles`) and cut into those tiles, row by row; when
there is more than one tile and a thumbnail is asked for, the whole image resized to one tile
follows them. The vision tower reads every tile on its own, so the LLM sees (tiles [+ 1]) x
image-tokens-per-tile image tokens for the image.

The grid is the one whose aspect ratio columns / rows is closest to W / H. Several grids can be
equally close (1x1, 2x2, 3x3 ... all have ratio 1): InternVL then moves to a larger grid only while
the image's area exceeds half the grid's area in pixels (W * H > 0.5 * tile^2 * columns * rows), so a
large image gets more tiles than a small one of the same shape. Among the equally close grids, taken
from the fewest tiles up, the result is the last one that passes that area test, or the first one
when none after it does. (Two different grids with the same tile count can only tie when
min_tiles > 1; they are then taken in (tiles, columns) order, where InternVL's order is that of a
Python set.)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TileSettings", "Grid", "candidate_grids", "choose_grid", "tile_count"]


@dataclass(frozen=True)
class Grid:
    columns: int
    rows: int

    @property
    def tiles(self) -> int:
        return self.columns * self.rows


@dataclass(frozen=True)
class TileSettings:
    """min_tiles <= columns * rows <= max_tiles; thumbnail: append the whole image as one more tile
    when the grid has more than one tile."""

    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True

    def __post_init__(self) -> None:
        for name in ("min_tiles", "max_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_tiles < self.min_tiles:
            raise ValueError(f"max_tiles: must be >= min_tiles ({self.min_tiles}), got {self.max_tiles}")
        if not isinstance(self.thumbnail, bool):
            raise ValueError(f"thumbnail: must be true or false, got {self.thumbnail!r}")


def candidate_grids(min_tiles: int, max_tiles: int) -> list[Grid]:
    """Every grid with min_tiles <= columns * rows <= max_tiles, fewest tiles first."""
    grids = [Grid(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)
             if min_tiles <= c * r]
    return sorted(grids, key=lambda g: (g.tiles, g.columns))


def choose_grid(width: int, height: int, tile: int, settings: TileSettings) -> Grid:
    """The grid an image of width x height pixels is resized to (see the module docstring)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size: expected positive width and height, got {width}x{height}")
    aspect = width / height
    grids = candidate_grids(settings.min_tiles, settings.max_tiles)
    # The float expressions are InternVL's (w / h against c / r), so exact ties are the same ties.
    distance = [abs(aspect - g.columns / g.rows) for g in grids]
    closest = min(distance)
    tied = [g for g, d in zip(grids, distance) if d == closest]
    area = width * height
    larger = [g for g in tied[1:] if area > 0.5 * tile * tile * g.tiles]
    return larger[-1] if larger else tied[0]


def tile_count(width: int, height: int, tile: int, settings: TileSettings) -> int:
    """Tiles the vision tower reads for the image: the grid's, plus the thumbnail where there is one."""
    tiles = choose_grid(width, height, tile, settings).tiles
    return tiles + 1 if settings.thumbnail and tiles > 1 else tiles
