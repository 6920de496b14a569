"""Vessel trees for the synthetic fundus: growth as random walks, rasterisation as capsules.

A tree is grown as a list of short straight pieces ("capsules": a segment with a radius). Every
vessel is a persistent random walk (its curvature is an AR(1) process, so it winds smoothly) that
is steered towards a heading, tapers slowly, and bifurcates. At a bifurcation the radii follow
Murray's law, r0^3 = r1^3 + r2^3, and the branch angles are the ones that minimise the work of
the flow for those radii (Murray 1926):

    cos(theta_1) = (r0^4 + r1^4 - r2^4) / (2 r0^2 r1^2)
    cos(theta_2) = (r0^4 + r2^4 - r1^4) / (2 r0^2 r2^2)

so a thin side branch leaves almost at a right angle while the parent barely turns, and a
symmetric split gives two ~37 degree branches.

Rasterisation evaluates the distance from every pixel centre in a capsule's bounding box to its
segment, for all capsules of similar size at once (one batched numpy computation per size
bucket). A pixel belongs to the vessel mask exactly when its centre lies within the capsule's
radius, and only those pixels are darkened, so the mask is exact with respect to what is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Capsules", "VesselRoot", "grow_tree", "rasterise"]

# The thinnest vessel drawn, in pixels. A capsule of radius 0.5 covers at least one pixel centre
# per row or column it crosses, so thin vessels stay connected one-pixel-wide lines in the mask.
MIN_DRAWN_RADIUS_PX = 0.5
# Vessels end when their radius falls below STOP_RADIUS_REL of the image side (the thinnest
# vessels a DRIVE-like ground truth marks, ~1.5 px wide at 565 px) or below STOP_RADIUS_PX (a
# sub-pixel vessel would be invisible at this resolution, so a real ground truth would not mark it).
STOP_RADIUS_REL = 0.0013
STOP_RADIUS_PX = 0.3
# Winding: the curvature (radians per image side) is an Ornstein-Uhlenbeck process in arc length
# with this correlation length (fraction of the image side); resolution independent.
CURVATURE_CORRELATION = 0.03


@dataclass
class Capsules:
    """Flat arrays, one entry per capsule, coordinates in pixels (x = column, y = row)."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    radius: np.ndarray  # true radius in pixels (drawn radius is max(radius, MIN_DRAWN_RADIUS_PX))
    depth: np.ndarray  # darkening strength at the centre line, 0..1
    reflex: np.ndarray  # strength of the bright central reflex, relative to depth

    def __len__(self) -> int:
        return int(self.x0.shape[0])


@dataclass
class VesselRoot:
    """Where and how a vessel leaves the optic disc."""

    x: float
    y: float
    heading: float  # radians, image coordinates (0 = +x, pi/2 = +y i.e. down)
    radius: float  # pixels
    depth: float
    reflex: float
    target_heading: float | None  # heading the trunk bends towards (arcades), None = radial


@dataclass
class TreeGeometry:
    """Scene facts the growth needs, in pixels."""

    size: int
    fov_cx: float
    fov_cy: float
    fov_r: float
    disc_x: float
    disc_y: float
    fovea_x: float
    fovea_y: float
    fovea_r: float  # vessels end at the border of the foveal avascular zone


class _NormalStream:
    """Pre-drawn standard normals / uniforms consumed one at a time (scalar rng calls are slow)."""

    def __init__(self, rng: np.random.Generator, block: int = 4096) -> None:
        self._rng = rng
        self._block = block
        self._normals: list[float] = []
        self._uniforms: list[float] = []

    def normal(self) -> float:
        if not self._normals:
            self._normals = self._rng.standard_normal(self._block).tolist()
        return self._normals.pop()

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if not self._uniforms:
            self._uniforms = self._rng.random(self._block).tolist()
        return low + (high - low) * self._uniforms.pop()


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _murray_split(r0: float, asymmetry: float) -> tuple[float, float, float, float]:
    """Radii (r1 >= r2) and branch angles of a Murray bifurcation with r2 / r1 = asymmetry."""
    r1 = r0 / (1.0 + asymmetry**3) ** (1.0 / 3.0)
    r2 = asymmetry * r1
    a0, a1, a2 = r0**2, r1**2, r2**2
    cos1 = (a0 * a0 + a1 * a1 - a2 * a2) / (2.0 * a0 * a1)
    cos2 = (a0 * a0 + a2 * a2 - a1 * a1) / (2.0 * a0 * a2)
    theta1 = math.acos(max(-1.0, min(1.0, cos1)))
    theta2 = math.acos(max(-1.0, min(1.0, cos2)))
    return r1, r2, theta1, theta2


def grow_tree(
    roots: list[VesselRoot], geometry: TreeGeometry, rng: np.random.Generator, max_capsules: int = 20000
) -> Capsules:
    """Grow every root into a branching tree and return all capsules drawn."""
    stream = _NormalStream(rng)
    size = float(geometry.size)
    # Lengths below are in units of the image side so one seed gives the same-looking tree at
    # any resolution; only the step length and the pruning of sub-pixel vessels depend on size.
    step_floor = 1.2  # pixels
    taper_per_side = 0.35  # radius shrinks by ~30% over one image side of vessel length
    # One row per capsule: x0, y0, x1, y1, radius, depth, reflex.
    rows: list[tuple[float, float, float, float, float, float, float]] = []

    # Stack entries: x, y, heading, radius, depth, reflex, target heading, generation.
    stack: list[tuple[float, float, float, float, float, float, float | None, int]] = [
        (root.x, root.y, root.heading, root.radius, root.depth, root.reflex, root.target_heading, 0)
        for root in reversed(roots)
    ]
    stop_radius = max(STOP_RADIUS_PX, STOP_RADIUS_REL * size)
    fov_limit_sq = geometry.fov_r**2
    fovea_r_sq = geometry.fovea_r**2
    while stack and len(rows) < max_capsules:
        x, y, heading, radius, depth, reflex, target, generation = stack.pop()
        curvature = 0.0
        # Thinner vessels wind more; trunks are steered harder so the arcades bend round the macula.
        wind = 4.0 + 3.0 * min(generation, 3)
        steer_gain = 4.0 if target is not None else 2.0
        travelled = 0.0
        next_branch = radius * stream.uniform(10.0, 28.0)
        while len(rows) < max_capsules:
            step = max(step_floor, 0.8 * radius)
            step_rel = step / size
            keep = math.exp(-step_rel / CURVATURE_CORRELATION)
            curvature = keep * curvature + wind * math.sqrt(1.0 - keep * keep) * stream.normal()
            # Untargeted vessels drift towards pointing radially away from the disc.
            desired = target if target is not None else math.atan2(y - geometry.disc_y, x - geometry.disc_x)
            heading += (curvature + steer_gain * _wrap(desired - heading)) * step_rel
            nx = x + step * math.cos(heading)
            ny = y + step * math.sin(heading)
            rows.append((x, y, nx, ny, radius, depth, reflex))
            x, y = nx, ny
            travelled += step
            radius *= 1.0 - taper_per_side * step_rel
            if (x - geometry.fov_cx) ** 2 + (y - geometry.fov_cy) ** 2 > fov_limit_sq:
                break
            if (x - geometry.fovea_x) ** 2 + (y - geometry.fovea_y) ** 2 < fovea_r_sq:
                break
            if radius < stop_radius:
                break
            if travelled >= next_branch:
                # Mostly small side branches, now and then a near-symmetric split.
                asymmetry = stream.uniform(0.25, 0.7) if stream.uniform() < 0.8 else stream.uniform(0.75, 1.0)
                r1, r2, theta1, theta2 = _murray_split(radius, asymmetry)
                side = 1.0 if stream.uniform() < 0.5 else -1.0
                if r2 >= stop_radius:
                    child_heading = heading - side * theta2
                    # Branches drift radially; only the continuing trunk keeps bending round the macula.
                    stack.append((x, y, child_heading, r2, depth, reflex, None, generation + 1))
                heading += side * theta1
                radius = r1
                next_branch = travelled + radius * stream.uniform(10.0, 28.0)

    table = np.asarray(rows, dtype=np.float32).reshape(-1, 7)
    return Capsules(*(np.ascontiguousarray(column) for column in table.T))


def rasterise(
    capsules: Capsules, height: int, width: int, radius_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw capsules: returns (darkness (H, W) float32 in 0..1, vessel mask (H, W) bool).

    Darkness follows Beer-Lambert through a cylinder (proportional to the chord length,
    sqrt(1 - u^2) at normalised distance u from the centre line), minus a narrow central reflex on
    vessels wide enough to show one; partial-volume dimming makes sub-2-pixel vessels fainter.
    Overlapping capsules combine by maximum, so junctions do not get darker than either vessel.
    """
    darkness = np.zeros(height * width, dtype=np.float32)
    mask = np.zeros(height * width, dtype=bool)
    if len(capsules) == 0:
        return darkness.reshape(height, width), mask.reshape(height, width)

    # radius_scale widens or thins every vessel without regrowing the tree (difficulty knob).
    true_r = capsules.radius * np.float32(radius_scale)
    drawn = true_r >= STOP_RADIUS_PX
    r = np.maximum(true_r, MIN_DRAWN_RADIUS_PX)
    x0, y0, x1, y1 = capsules.x0, capsules.y0, capsules.x1, capsules.y1
    xmin = np.floor(np.minimum(x0, x1) - r).astype(np.int64)
    xmax = np.ceil(np.maximum(x0, x1) + r).astype(np.int64)
    ymin = np.floor(np.minimum(y0, y1) - r).astype(np.int64)
    ymax = np.ceil(np.maximum(y0, y1) + r).astype(np.int64)
    xmin, ymin = np.maximum(xmin, 0), np.maximum(ymin, 0)
    xmax, ymax = np.minimum(xmax, width - 1), np.minimum(ymax, height - 1)
    drawn &= (xmax >= xmin) & (ymax >= ymin)
    extent = np.maximum(xmax - xmin, ymax - ymin) + 1

    # Partial volume: a vessel narrower than ~2 px only partly fills the pixels it crosses.
    depth = capsules.depth * np.minimum(1.0, true_r / 1.0) ** 0.7
    # The reflex is a thin bright stripe; it only shows on vessels a few pixels wide.
    reflex = capsules.reflex * np.clip((true_r - 1.2) / 1.5, 0.0, 1.0)

    # Bucket capsules by bounding-box size so each batch evaluates a tight square patch.
    bucket_edges = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    remaining = drawn.copy()
    for edge in bucket_edges + (int(extent.max()) + 1,):
        chosen = np.nonzero(remaining & (extent <= edge))[0]
        if chosen.size == 0:
            continue
        remaining[chosen] = False
        offsets = np.arange(edge)
        px = (xmin[chosen, None, None] + offsets[None, None, :]).astype(np.float32)
        py = (ymin[chosen, None, None] + offsets[None, :, None]).astype(np.float32)
        valid = (px <= xmax[chosen, None, None]) & (py <= ymax[chosen, None, None])
        ax, ay = x0[chosen, None, None], y0[chosen, None, None]
        dx, dy = (x1 - x0)[chosen, None, None], (y1 - y0)[chosen, None, None]
        length_sq = np.maximum(dx * dx + dy * dy, 1e-12)
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / length_sq, 0.0, 1.0)
        dist = np.hypot(px - ax - t * dx, py - ay - t * dy)
        rr = r[chosen, None, None]
        inside = valid & (dist <= rr)
        # Profile over radius + half a pixel so that even edge pixels of the mask are visibly
        # darkened (the pixel extends half a pixel towards the centre line).
        u = dist / (rr + 0.5)
        profile = np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))
        centre = np.exp(-((dist / (0.28 * rr)) ** 2))
        value = depth[chosen, None, None] * (profile - reflex[chosen, None, None] * centre)
        flat_index = (py.astype(np.int64) * width + px.astype(np.int64))[inside]
        np.maximum.at(darkness, flat_index, np.clip(value[inside], 0.0, 1.0))
        mask[flat_index] = True
    return darkness.reshape(height, width), mask.reshape(height, width)
