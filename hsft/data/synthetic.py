"""Synthetic colour fundus photographs with exact vessel and field-of-view masks.

`make_fundus(seed, size)` is deterministic in `seed`: the same seed gives bit-identical arrays.
The scene is composed like a real fundus photograph:

- a circular field of view (FOV) on black, with vignetting and uneven illumination;
- orange-red retina with low-frequency choroidal texture;
- a bright yellowish optic disc with a brighter cup, a darker macula and foveal reflex;
- vessel trees rooted at the disc (temporal arcades bending round the macula, nasal vessels,
  small macular branches), arteries thinner and lighter than veins, radii following Murray's law
  at bifurcations, tapering and winding (see `hsft.data.vessels`); vessels absorb most in the
  green channel and wide ones show a bright central reflex;
- then the degradations: haze, dust and reflection spots, optical blur, sensor noise and
  JPEG-like block artefacts.

Difficulty is per sample: a latent hardness h ~ Beta(1.3, 4) (mean 0.25, ~10% of samples above
0.5) drives four knobs, each with its own jitter: vessel contrast, noise level, vessel width and
artefact strength. So most samples are easy and a tail is hard, as in real collections. Pass a
`Difficulty` to pin the knobs; the scene geometry does not depend on them (independent random
streams), so one seed rendered at two difficulties shows the same eye.

The mask is the set of pixels whose centre lies inside a drawn vessel; exactly those pixels are
darkened before blur, so the mask is exact with respect to what was drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hsft.data.filters import gaussian_blur, jpeg_like
from hsft.data.sample import Sample
from hsft.data.vessels import TreeGeometry, VesselRoot, grow_tree, rasterise

__all__ = [
    "Difficulty",
    "draw_difficulty",
    "make_fundus",
    "optic_disc_mask",
    "MIN_SIZE",
    "SEEDS_PER_RANGE",
    "TRAIN_SEED_BASE",
    "TEST_SEED_BASE",
    "UNTOUCHED_SEED_BASE",
    "SEEDS_PER_SPLIT",
    "POOL_SEED_BASE",
]

MIN_SIZE = 32  # below this the disc, macula and vessels no longer fit as distinct structures

# Generator seed ranges, kept disjoint so no synthetic image is ever in two roles:
#   [0, 1e6)                      in-memory training split (sample i has seed i)
#   [1e6, 1.5e6)                  in-memory test split, the development split (sample i has seed 1e6 + i)
#   [1.5e6, 2e6)                  in-memory untouched test split (sample i has seed 1.5e6 + i)
#   [2e6 + s*1e6, 2e6 + (s+1)*1e6) pre-training pool number s (synthetic_pool(n, seed=s))
SEEDS_PER_RANGE = 1_000_000
SEEDS_PER_SPLIT = SEEDS_PER_RANGE // 2  # the two held-out splits share the second range, half each
TRAIN_SEED_BASE = 0
TEST_SEED_BASE = SEEDS_PER_RANGE
UNTOUCHED_SEED_BASE = TEST_SEED_BASE + SEEDS_PER_SPLIT
POOL_SEED_BASE = 2 * SEEDS_PER_RANGE

# Latent hardness distribution: right-skewed so most samples are easy with a tail of hard ones.
HARDNESS_BETA = (1.3, 4.0)


@dataclass(frozen=True)
class Difficulty:
    """Per-sample difficulty knobs.

    hardness:     latent value in [0, 1] the knobs were drawn from (0 = easiest); informative only.
    contrast:     multiplier on vessel darkening, in (0, 1.5]; 1 = normal, low = faint vessels.
    noise:        standard deviation of additive sensor noise, as a fraction of full scale, [0, 0.2].
    vessel_width: multiplier on every vessel radius, in [0.3, 2]; thin vessels vanish when low.
    artefacts:    in [0, 1]: strength of blur, haze, uneven illumination, spots and JPEG artefacts.
    """

    hardness: float
    contrast: float
    noise: float
    vessel_width: float
    artefacts: float

    def __post_init__(self) -> None:
        bounds = {
            "hardness": (0.0, 1.0),
            "contrast": (1e-3, 1.5),
            "noise": (0.0, 0.2),
            "vessel_width": (0.3, 2.0),
            "artefacts": (0.0, 1.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not (low <= value <= high):
                raise ValueError(f"Difficulty.{name} must lie in [{low}, {high}], got {value}")


def draw_difficulty(rng: np.random.Generator) -> Difficulty:
    """Draw the knobs of one sample from the skewed hardness distribution."""
    hardness = float(rng.beta(*HARDNESS_BETA))
    jitter = rng.normal(0.0, 1.0, size=4)
    contrast = float(np.clip(1.0 - 0.55 * hardness + 0.05 * jitter[0], 0.35, 1.1))
    noise = float(np.clip(0.006 + 0.03 * hardness**1.2 * (1.0 + 0.25 * jitter[1]), 0.002, 0.06))
    vessel_width = float(np.clip(1.08 - 0.3 * hardness + 0.05 * jitter[2], 0.6, 1.25))
    artefacts = float(np.clip(hardness + 0.1 * jitter[3], 0.0, 1.0))
    return Difficulty(hardness, contrast, noise, vessel_width, artefacts)


@dataclass(frozen=True)
class _Scene:
    """Geometry of one eye, in pixels."""

    size: int
    fov_cx: float
    fov_cy: float
    fov_r: float
    eye: int  # +1: disc on the left, macula to its right; -1: mirrored
    disc_x: float
    disc_y: float
    disc_r: float
    fovea_x: float
    fovea_y: float
    macula_r: float


def _draw_scene(rng: np.random.Generator, size: int) -> _Scene:
    centre = (size - 1) / 2.0
    eye = 1 if rng.random() < 0.5 else -1
    disc_x = centre - eye * rng.uniform(0.23, 0.29) * size
    disc_y = centre + rng.uniform(-0.05, 0.05) * size
    return _Scene(
        size=size,
        fov_cx=centre + rng.uniform(-0.01, 0.01) * size,
        fov_cy=centre + rng.uniform(-0.01, 0.01) * size,
        fov_r=rng.uniform(0.445, 0.475) * size,
        eye=eye,
        disc_x=disc_x,
        disc_y=disc_y,
        disc_r=rng.uniform(0.06, 0.075) * size,
        fovea_x=disc_x + eye * rng.uniform(0.32, 0.37) * size,
        fovea_y=disc_y + rng.uniform(0.0, 0.04) * size,
        macula_r=rng.uniform(0.09, 0.12) * size,
    )


def _vessel_roots(rng: np.random.Generator, scene: _Scene) -> list[VesselRoot]:
    """The vessels leaving the disc: arcade pairs, nasal pairs and a few small macular branches."""
    size, eye = scene.size, scene.eye
    temporal = 0.0 if eye == 1 else math.pi
    nasal = temporal + math.pi
    deg = math.pi / 180.0
    vein_r = 0.0085 * size * rng.uniform(0.9, 1.1)
    artery_r = 0.8 * vein_r * rng.uniform(0.92, 1.05)
    roots: list[VesselRoot] = []

    def add(heading: float, radius: float, is_artery: bool, target: float | None) -> None:
        offset = 0.2 * scene.disc_r
        roots.append(
            VesselRoot(
                x=scene.disc_x + offset * math.cos(heading),
                y=scene.disc_y + offset * math.sin(heading),
                heading=heading,
                radius=radius,
                depth=0.72 if is_artery else 1.0,
                reflex=0.45 if is_artery else 0.2,
                target_heading=target,
            )
        )

    for vertical in (-1.0, 1.0):  # -1: superior (up, towards -y), +1: inferior
        # Temporal arcades: leave the disc steeply, bend towards the horizontal raphe beyond the
        # macula; the artery and the vein of a pair leave at slightly different angles.
        spread = rng.uniform(55.0, 80.0) * deg
        bend_to = rng.uniform(-14.0, 2.0) * deg
        for is_artery, delta in ((False, 0.0), (True, rng.uniform(-14.0, 14.0) * deg)):
            heading = temporal + eye * vertical * (spread + delta)
            target = temporal + eye * vertical * bend_to
            add(heading, artery_r if is_artery else vein_r, is_artery, target)
        # Nasal vessels: smaller, radial.
        nasal_spread = rng.uniform(25.0, 70.0) * deg
        for is_artery, delta in ((False, 0.0), (True, rng.uniform(-15.0, 15.0) * deg)):
            heading = nasal - eye * vertical * (nasal_spread + delta)
            radius = (artery_r if is_artery else vein_r) * rng.uniform(0.6, 0.8)
            add(heading, radius, is_artery, None)
    for _ in range(int(rng.integers(1, 4))):
        heading = temporal + rng.uniform(-25.0, 25.0) * deg
        add(heading, vein_r * rng.uniform(0.3, 0.45), bool(rng.random() < 0.5), temporal)
    return roots


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean unit-ish random field varying over ~size/cells pixels (bicubic upsampled)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _background(rng: np.random.Generator, scene: _Scene, difficulty: Difficulty) -> np.ndarray:
    size = scene.size
    coords = np.arange(size, dtype=np.float32)
    xx, yy = coords[None, :], coords[:, None]
    nx = (xx - scene.fov_cx) / scene.fov_r
    ny = (yy - scene.fov_cy) / scene.fov_r
    rn = np.sqrt(nx * nx + ny * ny)

    # Retina colour varies with pigmentation between eyes.
    base = np.array([0.80, 0.37, 0.15], dtype=np.float32) * rng.uniform(0.88, 1.1, size=3).astype(np.float32)
    texture = _smooth_noise(rng, size, max(4, size // 10))
    image = base[None, None, :] * (1.0 + np.float32(0.05) * texture[..., None] * np.array([1.0, 0.6, 0.4], np.float32))

    vignette = 1.0 - rng.uniform(0.3, 0.55) * np.minimum(rn, 1.0) ** 2.5
    tilt = rng.normal(0.0, 1.0, size=2)
    unevenness = 0.06 + 0.22 * difficulty.artefacts
    illumination = 1.0 + unevenness * (tilt[0] * nx + tilt[1] * ny) / math.sqrt(2.0)
    illumination += 0.5 * unevenness * _smooth_noise(rng, size, 3)
    image *= (vignette * np.clip(illumination, 0.4, 1.6))[..., None]

    # Macula: darker, with a faint bright foveal reflex at its centre.
    dm = np.hypot(xx - scene.fovea_x, yy - scene.fovea_y)
    macula = 1.0 - rng.uniform(0.22, 0.38) * np.exp(-((dm / scene.macula_r) ** 2))
    image *= macula[..., None]
    image += np.float32(0.06) * np.exp(-((dm / (0.012 * size)) ** 2))[..., None]

    # Optic disc: bright yellowish disc with a soft rim and a paler cup.
    dd = np.hypot(xx - scene.disc_x, yy - scene.disc_y)
    disc = 1.0 / (1.0 + np.exp(np.minimum((dd - scene.disc_r) / (0.12 * scene.disc_r), 50.0)))
    cup = np.exp(-((dd / (0.45 * scene.disc_r)) ** 2))
    disc_colour = np.array([1.0, 0.86, 0.58], dtype=np.float32) * np.float32(rng.uniform(0.85, 1.0))
    cup_colour = np.array([1.0, 0.97, 0.86], dtype=np.float32)
    image = image * (1.0 - 0.8 * disc[..., None]) + 0.8 * disc[..., None] * disc_colour
    image = image * (1.0 - 0.5 * cup[..., None]) + 0.5 * cup[..., None] * cup_colour
    return image.astype(np.float32)


def _spots(rng: np.random.Generator, scene: _Scene, artefacts: float) -> np.ndarray:
    """Multiplicative field of dark dust spots and bright reflections (1 = no change)."""
    size = scene.size
    field = np.ones((size, size), dtype=np.float32)
    count = int(rng.poisson(5.0 * artefacts))
    for _ in range(count):
        angle, dist = rng.uniform(0.0, 2.0 * math.pi), scene.fov_r * math.sqrt(rng.uniform(0.0, 0.9))
        cx, cy = scene.fov_cx + dist * math.cos(angle), scene.fov_cy + dist * math.sin(angle)
        radius = rng.uniform(0.01, 0.05) * size
        bright = rng.random() < 0.4
        amplitude = rng.uniform(0.1, 0.3) if bright else -rng.uniform(0.1, 0.35)
        # Each spot only touches its bounding box: cheap even at full resolution.
        extent = int(math.ceil(3.0 * radius))
        x0, x1 = max(0, int(cx) - extent), min(size, int(cx) + extent + 1)
        y0, y1 = max(0, int(cy) - extent), min(size, int(cy) + extent + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=np.float32)[None, :]
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        bump = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * radius * radius))
        field[y0:y1, x0:x1] *= 1.0 + amplitude * bump
    return field


def make_fundus(seed: int, size: int = 128, difficulty: Difficulty | None = None) -> Sample:
    """Generate one synthetic fundus sample (square, `size` x `size` pixels), deterministic in seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    seed, size = int(seed), int(size)
    # Independent streams so that pinning the difficulty leaves the eye itself unchanged.
    knob_seq, scene_seq, tree_seq, degrade_seq = np.random.SeedSequence(seed).spawn(4)
    if difficulty is None:
        difficulty = draw_difficulty(np.random.default_rng(knob_seq))
    scene_rng = np.random.default_rng(scene_seq)
    scene = _draw_scene(scene_rng, size)

    geometry = TreeGeometry(
        size=size,
        fov_cx=scene.fov_cx,
        fov_cy=scene.fov_cy,
        fov_r=scene.fov_r,
        disc_x=scene.disc_x,
        disc_y=scene.disc_y,
        fovea_x=scene.fovea_x,
        fovea_y=scene.fovea_y,
        fovea_r=0.3 * scene.macula_r,
    )
    tree_rng = np.random.default_rng(tree_seq)
    capsules = grow_tree(_vessel_roots(tree_rng, scene), geometry, tree_rng)
    darkness, vessels = rasterise(capsules, size, size, radius_scale=difficulty.vessel_width)

    image = _background(scene_rng, scene, difficulty)
    # Haemoglobin absorbs most in green: vessels are darkest there, dark red in the red channel.
    absorption = np.array([0.3, 0.78, 0.65], dtype=np.float32) * np.float32(difficulty.contrast)
    image *= 1.0 - np.clip(darkness[..., None] * absorption, 0.0, 0.95)

    coords = np.arange(size, dtype=np.float32)
    radial = np.hypot(coords[None, :] - scene.fov_cx, coords[:, None] - scene.fov_cy)
    fov = radial <= scene.fov_r
    vessels &= fov
    # Soft one-pixel aperture edge; black outside.
    image *= np.clip(scene.fov_r - radial + 0.5, 0.0, 1.0)[..., None]

    degrade_rng = np.random.default_rng(degrade_seq)
    artefacts = difficulty.artefacts
    haze = 0.2 * artefacts * degrade_rng.uniform(0.4, 1.0)
    # Haze (media opacity, a dirty lens): a greyish-orange veil that flattens all contrast.
    haze_colour = np.array([0.55, 0.4, 0.3], dtype=np.float32)
    image = np.where(fov[..., None], image * (1.0 - haze) + haze * haze_colour, image)
    image *= _spots(degrade_rng, scene, artefacts)[..., None]
    # Optical blur grows slower than the image: a sharper camera is part of what a larger image is.
    image = gaussian_blur(image, (0.25 + 0.45 * artefacts) * math.sqrt(size / 128.0))
    noise = degrade_rng.standard_normal(image.shape, dtype=np.float32)
    image += np.float32(difficulty.noise) * noise * np.sqrt(np.clip(image, 0.05, 1.0) / 0.5)
    image = np.clip(image, 0.0, 1.0)
    image = jpeg_like(image, quality=int(round(92 - 50 * artefacts)))
    rgb = np.round(image * 255.0).astype(np.uint8)
    return Sample(id=f"synth_{seed:07d}", image=rgb, mask=vessels, fov=fov, source=f"synthetic:seed={seed}")


def optic_disc_mask(seed: int, size: int = 128) -> np.ndarray:
    """(size, size) bool: the optic disc of `make_fundus(seed, size)` (the pixels whose centre lies within
    the disc radius, inside the field of view). The scene has its own random stream, so the disc is the
    same at every difficulty."""
    _, scene_seq, _, _ = np.random.SeedSequence(int(seed)).spawn(4)
    scene = _draw_scene(np.random.default_rng(scene_seq), int(size))
    coords = np.arange(scene.size, dtype=np.float32)
    xx, yy = coords[None, :], coords[:, None]
    fov = np.hypot(xx - scene.fov_cx, yy - scene.fov_cy) <= scene.fov_r
    return (np.hypot(xx - scene.disc_x, yy - scene.disc_y) <= scene.disc_r) & fov
