"""Retinal vessel data: the synthetic fundus generator, readers for DRIVE, STARE, CHASE_DB1, HRF
and a generic folder layout, standard splits with a held-out test split, and augmentation.

    from hsft.data import DataConfig, load_splits
    splits = load_splits(DataConfig(format="drive", root="/data/DRIVE"))
    splits.train, splits.val, splits.test   # lists of Sample

Layouts and the split of each dataset are documented in hsft.data.layouts; the mask
binarisation rule in hsft.data.imageio; FOV derivation for datasets without FOV masks in
hsft.data.fov; the synthetic seed ranges in hsft.data.synthetic.
"""

from hsft.data.config import DataConfig
from hsft.data.layouts import FORMATS, SPLITS
from hsft.data.sample import DatasetError, Sample
from hsft.data.scan import SampleRef, scan_dataset
from hsft.data.splits import DataSplits, carve_validation, load_splits, synthetic_pool
from hsft.data.synthetic import Difficulty, draw_difficulty, make_fundus
from hsft.data.transforms import AugmentParams, augment_sample

__all__ = [
    "FORMATS",
    "SPLITS",
    "AugmentParams",
    "DataConfig",
    "DataSplits",
    "DatasetError",
    "Difficulty",
    "Sample",
    "SampleRef",
    "augment_sample",
    "carve_validation",
    "draw_difficulty",
    "load_splits",
    "make_fundus",
    "scan_dataset",
    "synthetic_pool",
]
