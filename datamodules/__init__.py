"""Segmentation datasets written once (:mod:`datamodules.dataset`: PASCAL, COCO, FSS-1000, your
own class folders, the generated ``shapes`` set), composed by the few-shot
(:mod:`datamodules.datamodule`) and semantic (:mod:`datamodules.semantic`) datamodules, and image
classification data (:mod:`datamodules.classification`);
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
from .coco import CocoDataset, CocoFewShot
from .datamodule import FewShotDataModule
from .dataset import SegmentationDataset
from .episode import Episode, collate_episodes
from .files import data_dir
from .folders import FSS1000, FolderDataset, FolderFewShot, FSS1000Dataset
from .pascal import PascalDataset, PascalFewShot
from .sampler import EpisodeSampler
from .shapes import SHAPE_CLASSES, ShapesDataset, ShapesFewShot, render_scene

__all__ = [
    "FSS1000",
    "SHAPE_CLASSES",
    "CifarData",
    "ClassificationDataModule",
    "CocoDataset",
    "CocoFewShot",
    "Episode",
    "EpisodeSampler",
    "FSS1000Dataset",
    "FewShotDataModule",
    "FolderDataset",
    "FolderFewShot",
    "ImageFolderData",
    "PascalDataset",
    "PascalFewShot",
    "SegmentationDataset",
    "ShapesClassification",
    "ShapesDataset",
    "ShapesFewShot",
    "collate_episodes",
    "data_dir",
    "render_scene",
]
