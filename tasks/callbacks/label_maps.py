"""Semantic label maps: validation images with ground truth and prediction in W&B, and
``predict``'s palette PNGs with overlays."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from datamodules.pascal import voc_palette
from datamodules.source import IGNORE
from tasks.callbacks.predictions import MaskWriter
from tasks.callbacks.visualise import predicted_masks, to_uint8


def class_labels(pl_module: LightningModule) -> dict[int, str]:
    """W&B's mask legend: the task's class names by index, and 255 ``ignore``."""
    names = pl_module.class_names() if hasattr(pl_module, "class_names") else []
    return {**dict(enumerate(names)), IGNORE: "ignore"}


class LogValidationLabelMaps(Callback):
    """Logs the first ``num_images`` validation images every epoch as ``val/label_maps``, with
    the ground-truth and predicted label maps as W&B masks (the validation list is fixed, so
    the same images are shown each epoch). Rank zero only, to a
    :class:`~lightning.pytorch.loggers.WandbLogger` only; the task's ``validation_step``
    returns its logits, as :class:`tasks.callbacks.visualise.LogValidationEpisodes` expects."""

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images

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
        count = min(self.num_images, batch["query_image"].shape[0])
        preds = predicted_masks(outputs[:count], batch["query_image"].shape[-2:])
        labels = class_labels(pl_module)
        images, masks = [], []
        for i in range(count):
            images.append(to_uint8(batch["query_image"][i]).cpu().numpy())
            masks.append(
                {
                    "ground_truth": {
                        "mask_data": batch["query_mask"][i].byte().cpu().numpy(),
                        "class_labels": labels,
                    },
                    "predictions": {
                        "mask_data": preds[i].byte().cpu().numpy(),
                        "class_labels": labels,
                    },
                }
            )
        captions = [str(name) for name in batch.get("query_id", [])[:count]] or None
        for logger in loggers:
            logger.log_image(
                "val/label_maps", images, step=trainer.global_step, masks=masks, caption=captions
            )


class LabelMapWriter(MaskWriter):
    """Saves ``<output_dir>/<name>.png`` (the predicted class indices as a VOC palette PNG, at
    the image's original size) and ``<name>_overlay.jpg`` (the image with each non-background
    class tinted in its palette colour); names and checks as
    :class:`tasks.callbacks.predictions.MaskWriter`.

    Args:
        output_dir: folder for the outputs; created if missing, checked writable first.
        alpha: opacity of the overlay tint.
    """

    palette = voc_palette()
    key = "labels"
