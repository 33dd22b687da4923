"""Few-shot segmentation data (PASCAL-5i, COCO-20i, the generated ``shapes`` set) and image
classification data (:mod:`datamodules.classification`).

The batch format is documented in :mod:`datamodules.episode`; how samples are sharded over DDP
processes in :mod:`datamodules.sampler`.
"""

from .classification import (
    CifarData,
    ClassificationDataModule,
    ImageFolderData,
    ShapesClassification,
)
from .coco import CocoFewShot
from .datamodule import FewShotDataModule, data_dir
from .episode import Episode, collate_episodes
from .pascal import PascalFewShot
from .sampler import EpisodeSampler
from .shapes import SHAPE_CLASSES, ShapesFewShot, render_scene

__all__ = [
    "SHAPE_CLASSES",
    "CifarData",
    "ClassificationDataModule",
    "CocoFewShot",
    "Episode",
    "EpisodeSampler",
    "FewShotDataModule",
    "ImageFolderData",
    "PascalFewShot",
    "ShapesClassification",
    "ShapesFewShot",
    "collate_episodes",
    "data_dir",
    "render_scene",
]
