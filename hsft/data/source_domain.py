"""The source domain of the embedded default's stand-in pre-training (stage 0): synthetic fundus
images of another camera and population than the target data, so that stage 0 plays a *generic*
pre-trained model and the fine-tuning stages have a domain to adapt to.

What differs from the target domain (hsft.data.synthetic with its drawn difficulty):
- colour: renderings blended between the colour photograph and a desaturated grey-brown one made
  mostly of the green channel (red-free-like cameras), at least MIN_STRENGTH of the way towards the
  latter, instead of the saturated orange-red colour photograph alone;
- population: every image is easy and clean (high vessel contrast, wide vessels, little noise, no
  artefacts), where the target has a tail of faint, thin, noisy vessels.
- annotation (`dilate_masks`, stage 0's `source_mask_dilation`): the source's vessel masks may be drawn
  wider than the target's, a coarser protocol, as generic segmentation data are coarser than vessel
  annotations.
The anatomy (disc, macula, vessel trees) is the same, so what stage 0 learns transfers, imperfectly.

`every_style_pool` is the broad image data of stage 0's first phase (the stand-in for SAM2's own
pre-training): every colour between the target's and the source's, the target's difficulty range.

Referring segmentation (`referring_source_pool`): each source image is asked three questions whose
masks differ on the same image, the vessels, the optic disc and the field of view, each in its own
words (REFERRING_QUESTIONS). A model trained on them must read the question, i.e. its mask decoder
must use the [SEG] state. None of the questions is the target's ("Please segment the blood vessel."),
so the target question is new to stage 0 as the target colours are.
"""

from __future__ import annotations

import numpy as np

from hsft.data.filters import box_mean
from hsft.data.sample import Sample
from dataclasses import dataclass

from hsft.data.synthetic import Difficulty, POOL_SEED_BASE, SEEDS_PER_RANGE, make_fundus, optic_disc_mask

__all__ = ["SOURCE_DIFFICULTY", "RED_FREE", "REFERRING_QUESTIONS", "ReferringSample", "to_source_style",
           "source_domain_pool", "every_style_pool", "dilate_masks", "pool_seeds", "ask_referring_questions",
           "referring_source_pool"]

# Each source image is the desaturated rendering blended with the colour photograph by a strength drawn
# from [MIN_STRENGTH, 1]: a range of cameras that does not reach the target's.
MIN_STRENGTH = 0.3
SOURCE_DIFFICULTY = Difficulty(hardness=0.0, contrast=1.1, noise=0.004, vessel_width=1.2, artefacts=0.05)
# Rows: output R, G, B as mixtures of the input channels, mostly the green one (where vessels show).
RED_FREE = np.array([[0.25, 0.65, 0.10], [0.10, 0.85, 0.05], [0.10, 0.60, 0.30]], dtype=np.float32)
# What stage 0 is asked about each source image: (target, the question). The vessel question is worded
# unlike the target data's default instruction on purpose.
REFERRING_QUESTIONS = (
    ("vessels", "Where are the retinal vessels?"),
    ("disc", "Where is the optic disc?"),
    ("fov", "Where is the field of view?"),
)


@dataclass
class ReferringSample:
    """A source image with the mask of one referred target and the question that asks for it."""

    sample: Sample  # its mask is the referred target's
    instruction: str


def to_source_style(sample: Sample, strength: float = 1.0) -> Sample:
    """The sample's image re-rendered in the source domain's desaturated colours, blended with the
    original by `strength` in [0, 1] (mask and FOV unchanged)."""
    rgb = sample.image.astype(np.float32) / 255.0
    mixed = np.clip(rgb @ RED_FREE.T * 1.15, 0.0, 1.0)
    mixed = (1.0 - strength) * rgb + strength * mixed
    image = np.round(mixed * 255.0).astype(np.uint8)
    return Sample(id=f"{sample.id}_source", image=image, mask=sample.mask, fov=sample.fov,
                  source=f"{sample.source};style=desaturated,easy")


def source_domain_pool(n: int, seed: int = 0, size: int = 128) -> list[Sample]:
    """`n` source-domain samples from the pre-training seed range (disjoint from every split)."""
    seeds = pool_seeds(n, seed)
    strengths = np.random.default_rng([seed, n]).uniform(MIN_STRENGTH, 1.0, size=n)
    return [to_source_style(make_fundus(s, size, difficulty=SOURCE_DIFFICULTY), float(strengths[i]))
            for i, s in enumerate(seeds)]


def every_style_pool(n: int, seed: int = 0, size: int = 128, skip: int = 0) -> list[Sample]:
    """`n` images of every colour style (blended 0-100 % of the way to the source colours) and the
    target's difficulty range, from pre-training pool `seed` after its first `skip` images (so disjoint
    from a source_domain_pool of `skip` images): the broad data a generic image encoder is trained on."""
    seeds = pool_seeds(skip + n, seed)[skip:]
    strengths = np.random.default_rng([seed, n, skip, 1]).uniform(0.0, 1.0, size=n)
    return [to_source_style(make_fundus(s, size), float(strengths[i])) for i, s in enumerate(seeds)]


def dilate_masks(samples: list[Sample], pixels: int) -> list[Sample]:
    """The samples with each vessel mask dilated by `pixels` (a (2p+1)-pixel square around every vessel
    pixel, kept inside the field of view): a coarser annotation protocol than the target's."""
    if pixels < 0:
        raise ValueError(f"pixels must be >= 0, got {pixels}")
    out = []
    for sample in samples:
        # A pixel is within `pixels` of a vessel when its window's mean is above zero (exact on 0/1 sums).
        window_mean = box_mean(sample.mask.astype(np.float64), pixels)
        mask = window_mean > 0.5 / (2 * pixels + 1) ** 2
        if sample.fov is not None:
            mask &= sample.fov
        out.append(Sample(id=sample.id, image=sample.image, mask=mask, fov=sample.fov,
                          source=f"{sample.source};mask_dilated={pixels}px"))
    return out


def pool_seeds(n: int, seed: int = 0) -> list[int]:
    """The generator seeds of pre-training pool `seed`'s first `n` images (as hsft.data.synthetic_pool
    and source_domain_pool draw them)."""
    if not 0 <= n <= SEEDS_PER_RANGE:
        raise ValueError(f"n must lie in [0, {SEEDS_PER_RANGE}], got {n}")
    return [POOL_SEED_BASE + seed * SEEDS_PER_RANGE + i for i in range(n)]


def ask_referring_questions(samples: list[Sample], image_seeds: list[int]) -> list[ReferringSample]:
    """Each pool image (made by make_fundus from its seed in `image_seeds`, in any style) once per
    REFERRING_QUESTIONS entry, image by image: the vessel mask, the optic disc, the field of view."""
    items = []
    for image_seed, sample in zip(image_seeds, samples, strict=True):
        masks = {"vessels": sample.mask, "disc": optic_disc_mask(image_seed, sample.size[0]), "fov": sample.fov.copy()}
        for target, question in REFERRING_QUESTIONS:
            # The loss counts the pixels inside the field of view; asked for the field of view itself, every
            # pixel counts, or the answer would be trivially "everything".
            fov = None if target == "fov" else sample.fov
            referred = Sample(id=f"{sample.id}_{target}", image=sample.image, mask=masks[target], fov=fov,
                              source=f"{sample.source};target={target}")
            items.append(ReferringSample(referred, question))
    return items


def referring_source_pool(n: int, seed: int = 0, size: int = 128) -> list[ReferringSample]:
    """The `n` images of `source_domain_pool(n, seed, size)`, each asked every referring question (3n items)."""
    return ask_referring_questions(source_domain_pool(n, seed=seed, size=size), pool_seeds(n, seed))
