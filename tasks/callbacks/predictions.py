"""Write ``predict`` outputs: each query's mask as a PNG at its original size, and an overlay."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from tasks.common import writable_folder

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
PALETTE = [0, 0, 0, 255, 40, 40] + [0, 0, 0] * 254  # 0 background, 1 foreground


class MaskWriter(BasePredictionWriter):
    """Saves ``<output_dir>/<query_id>.png`` (palette PNG, 0 background, 1 foreground) and
    ``<query_id>_overlay.jpg`` (the query with the foreground tinted) for every query.

    Args:
        output_dir: folder for the outputs; created if missing, checked writable before predicting.
        alpha: opacity of the overlay tint.
    """

    def __init__(self, output_dir: str = "predictions", alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.alpha = alpha

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writable_folder(self.output_dir, "--prediction_writer.output_dir", "predictions")

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
        for query_id, path, mask in zip(
            prediction["query_id"], prediction["query_path"], prediction["masks"], strict=True
        ):
            mask = mask.numpy().astype(np.uint8)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(PALETTE)
            png.save(self.output_dir / f"{query_id}.png")
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
            tint = mask[..., None].astype(np.float32) * self.alpha
            overlay = image * (1 - tint) + OVERLAY_COLOUR * tint
            Image.fromarray(overlay.round().astype(np.uint8)).save(
                self.output_dir / f"{query_id}_overlay.jpg", quality=95
            )
