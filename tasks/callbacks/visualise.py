"""Validation episodes as W&B images: support and query side by side, with masks."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from datamodules.source import IGNORE
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.heads.common import vote
from tasks.layers import resize

CLASS_LABELS = {0: "background", 1: "object", IGNORE: "ignore"}


def to_uint8(image: Tensor) -> Tensor:
    """Undo the ImageNet normalisation: [3, H, W] float -> [H, W, 3] uint8."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)


def predicted_masks(logits: Tensor, size: torch.Size) -> Tensor:
    """[B, 2, h, w] logits, or a voting head's per-shot [B, K, 2, h, w] (combined by
    :func:`~tasks.heads.common.vote`, as evaluation does) -> [B, *size] masks."""
    if logits.ndim == 5:
        return vote(torch.stack([predicted_masks(s, size) for s in logits.unbind(1)], 1))
    return resize(logits.float(), size).argmax(1)


class LogValidationEpisodes(Callback):
    """Logs the first ``num_episodes`` validation episodes every epoch.

    The validation list is fixed, so the same episodes are shown each epoch and their predictions
    can be compared over training. Each picture is ``[support 1 .. support K | query]`` with the
    ground truth (support and query) and the prediction (query) as W&B masks. Only rank zero logs,
    and only to a :class:`~lightning.pytorch.loggers.WandbLogger`.
    """

    def __init__(self, num_episodes: int = 4) -> None:
        self.num_episodes = num_episodes

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if batch_idx != 0 or not loggers or not trainer.is_global_zero or trainer.sanity_checking:
            return
        count = min(self.num_episodes, batch["query_image"].shape[0])
        size = batch["query_image"].shape[-2:]
        preds = predicted_masks(outputs, size)
        images, masks = [], []
        for i in range(count):
            frames = [*batch["support_images"][i], batch["query_image"][i]]
            truth = [*batch["support_masks"][i], batch["query_mask"][i]]
            empty = [torch.zeros_like(m) for m in batch["support_masks"][i]]
            images.append(torch.cat([to_uint8(f) for f in frames], 1).cpu().numpy())
            masks.append(
                {
                    "ground_truth": {
                        "mask_data": torch.cat(truth, 1).byte().cpu().numpy(),
                        "class_labels": CLASS_LABELS,
                    },
                    "predictions": {
                        "mask_data": torch.cat([*empty, preds[i]], 1).byte().cpu().numpy(),
                        "class_labels": CLASS_LABELS,
                    },
                }
            )
        names = pl_module.class_names() if hasattr(pl_module, "class_names") else None
        captions = [names[c] if names else str(c) for c in batch["class_id"][:count].tolist()]
        for logger in loggers:
            logger.log_image(
                "val/episodes", images, step=trainer.global_step, masks=masks, caption=captions
            )
