"""Semantic label maps: validation images with ground truth and prediction in W&B, and
``predict``'s palette PNGs with overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from datamodules.pascal import save_label_png, voc_palette
from datamodules.source import IGNORE
from tasks.callbacks.predictions import check_apart, output_names
from tasks.callbacks.visualise import predicted_masks, to_uint8
from tasks.common import writable_folder


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


class LabelMapWriter(BasePredictionWriter):
    """Saves ``<output_dir>/<name>.png`` (the predicted class indices as a VOC palette PNG, at
    the image's original size) and ``<name>_overlay.jpg`` (the image with each non-background
    class tinted in its palette colour); ``name`` as :class:`tasks.callbacks.predictions.MaskWriter`
    names it, and a folder holding inputs is refused before predicting.

    Args:
        output_dir: folder for the outputs; created if missing, checked writable first.
        alpha: opacity of the overlay tint.
    """

    def __init__(self, output_dir: str = "predictions", alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.alpha = alpha
        self.names: dict[str, str] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writable_folder(self.output_dir, "--prediction_writer.output_dir", "predictions")
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        queries = [q for loader in loaders for q in getattr(loader.dataset, "queries", [])]
        self.names = output_names(queries)
        check_apart(self.output_dir, queries, self.names)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
        for query_id, path, label in zip(
            prediction["query_id"], prediction["query_path"], prediction["labels"], strict=True
        ):
            label = label.numpy().astype(np.uint8)
            name = self.output_dir / self.names.get(str(path), query_id)
            name.parent.mkdir(parents=True, exist_ok=True)
            save_label_png(label, name.with_name(f"{name.name}.png"))
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
            tint = (label > 0)[..., None] * self.alpha
            overlay = image * (1 - tint) + colours[label] * tint
            Image.fromarray(overlay.round().astype(np.uint8)).save(
                name.with_name(f"{name.name}_overlay.jpg"), quality=95
            )
