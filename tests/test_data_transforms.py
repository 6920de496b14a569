"""Training augmentation: flips keep image, mask and FOV aligned; jitter is seeded and bounded."""

import numpy as np
import pytest

from hsft.data import AugmentParams, Sample, augment_sample, make_fundus


def _marked_sample() -> Sample:
    # A vessel mask that is readable from the image itself, so alignment after a flip is testable.
    sample = make_fundus(4, 48)
    image = sample.image.copy()
    image[sample.mask] = (0, 0, 255)
    return Sample(sample.id, image, sample.mask, sample.fov, sample.source)


@pytest.mark.parametrize("hflip,vflip", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_flips_move_image_mask_and_fov_together(hflip, vflip):
    sample = _marked_sample()
    out = augment_sample(sample, 0, AugmentParams(hflip=hflip, vflip=vflip, brightness=0.0, contrast=0.0))
    expected_mask = sample.mask
    if hflip:
        expected_mask = expected_mask[:, ::-1]
    if vflip:
        expected_mask = expected_mask[::-1]
    assert np.array_equal(out.mask, expected_mask)
    assert not np.array_equal(out.mask, sample.mask)
    assert np.array_equal(out.image[..., 2] == 255, out.mask)  # the blue marks followed the mask
    assert out.image.flags.c_contiguous and out.fov.shape == out.mask.shape


def test_same_seed_same_augmentation_and_jitter_is_bounded():
    sample = make_fundus(2, 48)
    params = AugmentParams(hflip=0.5, vflip=0.5, brightness=0.1, contrast=0.1)
    a, b = augment_sample(sample, 7, params), augment_sample(sample, 7, params)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    jitter_only = AugmentParams(hflip=0.0, vflip=0.0, brightness=0.1, contrast=0.1)
    outputs = [augment_sample(sample, seed, jitter_only) for seed in range(8)]
    assert len({o.image.tobytes() for o in outputs}) == 8
    for out in outputs:
        # Outside the aperture stays as recorded; inside, the mean moves by at most ~10% of full scale.
        assert np.array_equal(out.image[~out.fov], sample.image[~sample.fov])
        assert abs(out.image[out.fov].mean() - sample.image[sample.fov].mean()) <= 0.1 * 255 + 1


def test_augmentation_params_are_checked():
    with pytest.raises(ValueError, match="AugmentParams.hflip"):
        AugmentParams(hflip=1.5)
