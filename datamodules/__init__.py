"""Few-shot segmentation data (PASCAL-5i, COCO-20i, FSS-1000, your own class folders, the
generated ``shapes`` set) and image classification data (:mod:`datamodules.classification`);
``python -m datamodules.prepare`` builds the PASCAL and COCO trees (:mod:`datamodules.prepare`).

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
from .folders import FSS1000, FolderFewShot
from .pascal import PascalFewShot
from .sampler import EpisodeSampler
from .shapes import SHAPE_CLASSES, ShapesFewShot, render_scene

__all__ = [
    "FSS1000",
    "SHAPE_CLASSES",
    "CifarData",
    "ClassificationDataModule",
    "CocoFewShot",
    "Episode",
    "EpisodeSampler",
    "FewShotDataModule",
    "FolderFewShot",
    "ImageFolderData",
    "PascalFewShot",
    "ShapesClassification",
    "ShapesFewShot",
    "collate_episodes",
    "data_dir",
    "render_scene",
]
