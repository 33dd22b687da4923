"""What both segmentation tasks score and train with: logits upsampled as PFENet/ASGNet, the
cross-entropy reductions, and predictions at each query's original size (the batch contract of
:mod:`datamodules.episode`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.source import IGNORE
from tasks.heads.common import vote
from tasks.layers import resize


def upsample(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear with ``align_corners=True``, as PFENet/ASGNet resize logits to the label."""
    return resize(logits, size)


def episode_mean_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The mean over episodes of each episode's cross-entropy averaged over its labelled pixels
    (255 ignored). Every episode weighs the same, so the loss and its gradient do not depend on
    how a global batch is split over devices and accumulated batches."""
    pixels = nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    pixels = pixels.flatten(1)
    labelled = (target != IGNORE).flatten(1).sum(1).clamp(min=1)
    return (pixels.sum(1) / labelled).mean()


def pixel_mean_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The cross-entropy averaged over the batch's labelled pixels (255 ignored): the papers'
    ``nn.CrossEntropyLoss(ignore_index=255)`` on one device, where an episode weighs by its
    labelled pixels. Over devices and accumulated batches the task makes it the mean over the
    global batch's pixels (:meth:`FewShotSegmentation.on_before_optimizer_step`)."""
    pixels = nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    return pixels / (target != IGNORE).sum().clamp(min=1)


#: ``loss_reduction`` of the protocol (:mod:`datamodules.protocols`) -> the batch criterion
LOSS_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "episodes": episode_mean_cross_entropy,
    "pixels": pixel_mean_cross_entropy,
}


def original_size_predictions(logits: Tensor, batch: Mapping[str, Any]) -> list[Tensor]:
    """Each query's prediction [h, w] at its original size: the logits, upsampled to the model
    input, cropped to ``query_valid``, resized to ``query_resize_to`` and cropped to
    ``query_size`` (the batch contract of :mod:`datamodules.episode`: the clean protocol crops
    then resizes; PFENet's ``ori_resize`` resizes the whole padded output to a square).

    Per-shot logits [B, K, 2, h, w] (:func:`scored_logits`) give each shot's prediction at that
    resolution, combined by HSNet's :func:`~tasks.heads.common.vote`."""
    if logits.ndim == 5:
        shots = [original_size_predictions(shot, batch) for shot in logits.unbind(1)]
        return [vote(torch.stack(query)) for query in zip(*shots, strict=True)]
    logits = upsample(logits, batch["query_image"].shape[-2:])
    resize_to = batch.get("query_resize_to", batch["query_size"]).tolist()
    valid, sizes = batch["query_valid"].tolist(), batch["query_size"].tolist()
    geometry = zip(valid, resize_to, sizes, strict=True)
    return [
        upsample(logits[i : i + 1, :, :h_valid, :w_valid], target).argmax(1)[0, :h, :w]
        for i, ((h_valid, w_valid), target, (h, w)) in enumerate(geometry)
    ]


def original_resolution_predictions(logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Predictions [B, Hmax, Wmax] aligned with ``query_label`` (0 in its 255 padding)."""
    preds = torch.zeros_like(batch["query_label"])
    for i, pred in enumerate(original_size_predictions(logits, batch)):
        preds[i, : pred.shape[0], : pred.shape[1]] = pred
    return preds
