"""Episodes and the batch contract shared by every few-shot datamodule.

An episode is one query image and ``K`` support images (``K >= 1``, never including the query)
with binary masks of one class ``c``. Every loader (train, val, test) yields a dict:

=================  ==========================  ==================================================
key                type / shape                meaning
=================  ==========================  ==================================================
``query_image``    float32 ``[B, 3, S, S]``    ImageNet mean/std normalised
``query_mask``     int64 ``[B, S, S]``         1 class ``c``, 0 other, 255 ignore
``support_images`` float32 ``[B, K, 3, S, S]`` normalised like the query
``support_masks``  int64 ``[B, K, S, S]``      1 / 0 / 255 like ``query_mask``
``class_id``       int64 ``[B]``               0-based index into ``class_names`` (VOC k -> k-1)
=================  ==========================  ==================================================

``S`` is the datamodule's ``image_size`` (in test, the protocol's ``eval_size``). Validation and
test batches add:

=================  ==========================  ==================================================
``query_label``    int64 ``[B, Hmax, Wmax]``   the query's binary label (0/1/255) at its original
                                               resolution, padded with 255 at the bottom/right to
                                               the largest query of the batch
``query_size``     int64 ``[B, 2]``            original ``(h, w)``
``query_valid``    int64 ``[B, 2]``            ``(h, w)`` of the resized image inside the padded
                                               ``S x S`` input (placed at the top-left)
``query_resize_to`` int64 ``[B, 2]``           the size ``query_valid``'s region is resized to
                                               before cropping to ``query_size``
``query_id``       ``list[str]``               file ids of the queries
=================  ==========================  ==================================================

Under a protocol that scores at the input resolution (HSNet), ``query_label`` is the transformed
``query_mask`` and ``query_size`` = ``query_valid`` = ``query_resize_to`` = ``(S, S)``. Under
PFENet's ``ori_resize`` (``square``), the whole ``S x S`` output (``query_valid``) is resized to
a square of the label's longer side (``query_resize_to``) and cropped to ``query_size``. So one
scoring rule (:func:`tasks.segment.original_size_predictions`) serves every convention.

Training labels follow PFENet: the episode's class is 1, every other class 0, 255 kept. To score
at the original resolution as PFENet/ASGNet (``ori_resize``): crop the logits to
``[:h_valid, :w_valid]``, resize them to ``query_size`` and compare with
``query_label[:h, :w]``; 255 is ignored.

Which episodes: training draws new episodes over the base classes every epoch; validation is a
fixed list over the base classes of held-out training images; test a fixed list over the novel
classes of the test list (:mod:`datamodules.datamodule`). Loaders are driven by
:class:`datamodules.sampler.EpisodeSampler`, which shards episodes across DDP ranks itself (a
``DistributedSampler`` subclass, which Lightning leaves in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .protocols import EvalPad, EvalResize, Scoring
from .source import IGNORE, SegmentationSource
from .transforms import valid_size

Batch = dict[str, Any]
JointTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Episode:
    """Which images make an episode; samplers yield these and the dataset loads them.

    ``seed`` (training episodes) seeds the episode's random augmentation, so that it is the same
    in whichever process or loader worker loads the episode.
    """

    query: str
    class_id: int
    support: tuple[str, ...]
    seed: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """How evaluation queries are resized, padded and where they are scored."""

    size: int
    resize: EvalResize = "longer_pad"
    scoring: Scoring = "original"
    pad: EvalPad = "mean"

    def label_fields(self, label: np.ndarray, mask: torch.Tensor) -> Batch:
        """``query_label``, ``query_size``, ``query_valid`` and ``query_resize_to`` of a query."""
        canvas = torch.tensor([self.size, self.size])
        if self.scoring == "input":
            return {
                "query_label": mask,
                "query_size": canvas,
                "query_valid": canvas.clone(),
                "query_resize_to": canvas.clone(),
            }
        height, width = label.shape
        size = torch.tensor([height, width])
        if self.scoring == "square":  # PFENet's ori_resize
            valid, resize_to = canvas, torch.tensor([max(height, width)] * 2)
        else:
            valid = torch.tensor(valid_size(height, width, self.size, self.resize))
            resize_to = size.clone()
        return {
            "query_label": torch.from_numpy(label).long(),
            "query_size": size,
            "query_valid": valid,
            "query_resize_to": resize_to,
        }


def binary_label(label: np.ndarray, class_id: int, keep_ignore: bool = True) -> np.ndarray:
    """1 where the label is class ``class_id`` (0-based), 255 where ignored (or 0 without
    ``keep_ignore``: HSNet's COCO masks make crowd pixels background), 0 elsewhere."""
    binary = (label == class_id + 1).astype(np.uint8)
    if keep_ignore:
        binary[label == IGNORE] = IGNORE
    return binary


class EpisodeDataset(Dataset):
    """Loads and transforms the images of an :class:`Episode` into one batch item.

    Indexed by :class:`Episode` (from :class:`datamodules.sampler.EpisodeSampler`), not by int.

    Args:
        source: where the images and labels come from.
        transform: joint image/mask transform (:mod:`datamodules.transforms`).
        evaluation: add the query's scoring label and its geometry (``None`` in training).
        keep_ignore: keep the label's 255 pixels ignored; ``False`` makes them background.
    """

    def __init__(
        self,
        source: SegmentationSource,
        transform: JointTransform,
        evaluation: Evaluation | None = None,
        keep_ignore: bool = True,
    ) -> None:
        self.source = source
        self.transform = transform
        self.evaluation = evaluation
        self.keep_ignore = keep_ignore

    def _load(self, image_id: str, class_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        image, label = self.source.read(image_id)
        binary = binary_label(label, class_id, self.keep_ignore)
        pixels = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        image_t, mask_t = self.transform(pixels, tv_tensors.Mask(torch.from_numpy(binary)))
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long(), binary

    def __getitem__(self, episode: Episode) -> Batch:  # type: ignore[override]
        with torch.random.fork_rng(devices=[], enabled=episode.seed is not None):
            if episode.seed is not None:
                torch.random.default_generator.manual_seed(episode.seed)
            query_image, query_mask, query_label = self._load(episode.query, episode.class_id)
            support = [self._load(image_id, episode.class_id)[:2] for image_id in episode.support]
        item: Batch = {
            "query_image": query_image,
            "query_mask": query_mask,
            "support_images": torch.stack([image for image, _ in support]),
            "support_masks": torch.stack([mask for _, mask in support]),
            "class_id": torch.tensor(episode.class_id),
        }
        if self.evaluation is not None:
            item.update(self.evaluation.label_fields(query_label, query_mask))
            item["query_id"] = episode.query
        return item


def collate_episodes(items: Sequence[Batch]) -> Batch:
    """Stack items; pad ``query_label`` with 255 to the batch's largest; list strings (ids)."""
    batch: Batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], str):
            batch[key] = values
        elif key == "query_label":
            height = max(value.shape[0] for value in values)
            width = max(value.shape[1] for value in values)
            padded = torch.full((len(values), height, width), IGNORE, dtype=torch.long)
            for row, value in zip(padded, values, strict=True):
                row[: value.shape[0], : value.shape[1]] = value
            batch[key] = padded
        else:
            batch[key] = torch.stack(values)
    return batch
