"""Episodes and the batch contract shared by every few-shot datamodule.

An episode is one query image and ``K`` support images (``K >= 1``, never including the query)
with binary masks of one class ``c``. Every loader (train, val, test) yields a dict of ``uint8``
pixels (a quarter of float32's bytes through workers, pinned memory and the host-to-device copy):

=================  ==========================  ==================================================
key                type / shape                meaning
=================  ==========================  ==================================================
``query_image``    uint8 ``[B, 3, S, S]``      RGB
``query_mask``     uint8 ``[B, S, S]``         1 class ``c``, 0 other, 255 ignore
``support_images`` uint8 ``[B, K, 3, S, S]``   RGB like the query
``support_masks``  uint8 ``[B, K, S, S]``      1 / 0 / 255 like ``query_mask``
``class_id``       int64 ``[B]``               0-based index into ``class_names`` (VOC k -> k-1)
=================  ==========================  ==================================================

On the model's device, :func:`to_model_inputs` (the datamodule's ``on_after_batch_transfer``)
turns the images into the model's floating type (float32), normalised with the ImageNet
mean/std, and the masks and labels into int64; what the models, losses and metrics see is that.
``S`` is the datamodule's ``image_size`` (in test, the protocol's ``eval_size``). Validation and
test batches add:

=================  ==========================  ==================================================
``query_label``    uint8 ``[B, Hmax, Wmax]``   the query's binary label (0/1/255) at its original
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
scoring rule (:func:`tasks.scoring.original_size_predictions`) serves every convention.

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

from .protocols import EvalPad, EvalResize, Scoring
from .source import IGNORE, SegmentationSource
from .transforms import (
    MEAN_FILL,
    Plan,
    TrainTransform,
    inverse_map,
    normalise,
    render_on_device,
    valid_size,
)

Batch = dict[str, Any]
#: ``(image uint8 [H, W, 3], mask uint8 [H, W], generator) -> (uint8 [S, S, 3], uint8 [S, S])``
#: (:mod:`datamodules.transforms`); evaluation transforms ignore the generator.
JointTransform = Callable[
    [np.ndarray, np.ndarray, np.random.Generator | None], tuple[np.ndarray, np.ndarray]
]
#: The batch's pixel fields, normalised on the device, and its label fields, made int64 there.
IMAGE_FIELDS = ("query_image", "support_images")
LABEL_FIELDS = ("query_mask", "support_masks", "query_label")
#: With ``--data.augment_on gpu``, ``<role>_source`` (``query``: ``uint8 [B, 3, H, W]``,
#: ``support``: ``[B, K, 3, H, W]``, the decoded images padded at the bottom/right) replaces the
#: role's images, with these fields of each image's plan (suffixes of ``<role>_``): the
#: crop-to-source map ``[..., 2, 3]``, the scaled image's rectangle in the crop ``[..., 4]``,
#: the blur and rotation flags and the source's ``(h, w)``.
PLAN_FIELDS = ("warp", "rect", "blur", "rotated", "hw")


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
            "query_label": torch.from_numpy(label),
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

    def _load(
        self, image_id: str, class_id: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Plan | None]:
        """Image (or, to be rendered on the device, the decoded source), mask, the query's
        binary label, and the :class:`~datamodules.transforms.Plan` of a device rendering."""
        image, label = self.source.read(image_id)
        binary = binary_label(label, class_id, self.keep_ignore)
        if isinstance(self.transform, TrainTransform) and self.transform.on_device:
            plan = self.transform.plan(binary, rng)
            return image, plan.mask, binary, plan
        return *self.transform(image, binary, rng), binary, None

    def __getitem__(self, episode: Episode) -> Batch:  # type: ignore[override]
        rng = np.random.default_rng(episode.seed)
        query_image, query_mask, query_label, plan = self._load(
            episode.query, episode.class_id, rng
        )
        support = [self._load(image_id, episode.class_id, rng) for image_id in episode.support]
        item: Batch = {
            "query_mask": torch.from_numpy(query_mask),
            "support_masks": torch.from_numpy(np.stack([mask for _, mask, _, _ in support])),
            "class_id": torch.tensor(episode.class_id),
        }
        if plan is None:
            item["query_image"] = image_tensor(query_image)
            item["support_images"] = image_tensor(np.stack([image for image, *_ in support]))
        else:  # rendered on the device (to_model_inputs)
            item.update(plan_fields("query", [query_image], [plan], squeeze=True))
            item.update(plan_fields("support", [s[0] for s in support], [s[3] for s in support]))
        if self.evaluation is not None:
            item.update(self.evaluation.label_fields(query_label, item["query_mask"]))
            item["query_id"] = episode.query
        return item


def plan_fields(
    role: str, sources: Sequence[np.ndarray], plans: Sequence[Plan], squeeze: bool = False
) -> Batch:
    """``<role>_source`` (the decoded images) and the :data:`PLAN_FIELDS` of images rendered on
    the device (one image without the leading shot dimension when ``squeeze``)."""
    fields = {
        f"{role}_source": [image_tensor(source) for source in sources],
        f"{role}_warp": torch.from_numpy(np.stack([inverse_map(p.matrix) for p in plans])),
        f"{role}_rect": torch.tensor([p.rect for p in plans]),
        f"{role}_blur": torch.tensor([p.draw.blur for p in plans]),
        f"{role}_rotated": torch.tensor([bool(p.draw.angle) for p in plans]),
        f"{role}_hw": torch.tensor([source.shape[:2] for source in sources]),
    }
    if squeeze:
        return {key: value[0] for key, value in fields.items()}
    return fields


def pad_sources(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8 [N, 3, Hmax, Wmax]`` (channels-last memory) of images ``[3, h, w]`` placed at the
    top-left, the rest :data:`~datamodules.transforms.MEAN_FILL` (the crops' fill)."""
    height = max(source.shape[-2] for source in sources)
    width = max(source.shape[-1] for source in sources)
    canvas = torch.empty((len(sources), height, width, 3), dtype=torch.uint8)
    canvas[:] = torch.tensor(MEAN_FILL, dtype=torch.uint8)
    for row, source in zip(canvas, sources, strict=True):
        row[: source.shape[-2], : source.shape[-1]] = source.movedim(-3, -1)
    return canvas.movedim(-1, -3)


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` viewing ``[..., H, W, 3]`` pixels (channels-last memory)."""
    return torch.from_numpy(pixels).movedim(-1, -3)


def collate_episodes(items: Sequence[Batch]) -> Batch:
    """Stack items; pad ``query_label`` with 255 to the batch's largest; list strings (ids).

    Images are stacked in their channels-last memory (a copy of contiguous rows; stacking the
    ``[3, H, W]`` views element by element costs several times more)."""
    batch: Batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], str):
            batch[key] = values
        elif key in IMAGE_FIELDS:
            batch[key] = torch.stack([value.movedim(-3, -1) for value in values]).movedim(-1, -3)
        elif key == "query_source":
            batch[key] = pad_sources(values)
        elif key == "support_source":
            shots = len(values[0])
            flat = pad_sources([source for sources in values for source in sources])
            batch[key] = flat.unflatten(0, (len(values), shots))
        elif key == "query_label":
            height = max(value.shape[0] for value in values)
            width = max(value.shape[1] for value in values)
            padded = torch.full((len(values), height, width), IGNORE, dtype=values[0].dtype)
            for row, value in zip(padded, values, strict=True):
                row[: value.shape[0], : value.shape[1]] = value
            batch[key] = padded
        else:
            batch[key] = torch.stack(values)
    return batch


def input_dtype(module: torch.nn.Module | None) -> torch.dtype:
    """The floating type a model's inputs take: its own (float64 under ``precision=64-true``),
    float32 for a model without one or with integer parameters."""
    dtype = getattr(module, "dtype", torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


def to_model_inputs(batch: Batch, dtype: torch.dtype = torch.float32) -> Batch:
    """The batch as models see it, on the batch's device: ``uint8`` images as float32 normalised
    with the ImageNet mean/std (:func:`datamodules.transforms.normalise`), masks and labels as
    int64; images to be rendered on the device (``--data.augment_on gpu``) rendered first
    (:func:`datamodules.transforms.render_on_device`). Fields already converted pass unchanged.
    ``dtype``: the images' floating type (the model's: float64 under ``precision=64-true``)."""
    converted = dict(batch)
    if "query_source" in batch:
        size = batch["query_mask"].shape[-1]
        for role, key in (("query", "query_image"), ("support", "support_images")):
            sources = converted.pop(f"{role}_source")
            fields = [converted.pop(f"{role}_{name}") for name in PLAN_FIELDS]
            lead = sources.shape[:-3]  # [B] or [B, K]
            flat = [tensor.flatten(0, len(lead) - 1) for tensor in (sources, *fields)]
            crops = render_on_device(*flat, size).unflatten(0, lead)
            converted[key] = normalise(crops).to(dtype)
    for key in IMAGE_FIELDS:
        if key in batch and batch[key].dtype == torch.uint8:
            converted[key] = normalise(batch[key]).to(dtype)
    for key in LABEL_FIELDS:
        if key in batch:
            converted[key] = batch[key].long()
    return converted
