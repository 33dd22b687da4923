"""Write ``predict`` outputs: each query's mask as a PNG at its original size (as shown: EXIF
orientation applied, as the loaders read it), and an overlay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from datamodules.files import writable_folder
from datamodules.source import open_image

PALETTE = [0, 0, 0, 255, 40, 40] + [0, 0, 0] * 254  # 0 background, 1 foreground


def output_names(queries: Sequence[Path]) -> dict[str, str]:
    """Each query's output name (by its path): its file stem, or, when two queries share a stem
    (``a/1.jpg``, ``b/1.jpg``), its path from the queries' common folder without the suffix
    (``a/1``, ``b/1``), so that no prediction overwrites another."""
    stems = [query.stem for query in queries]
    if len(set(stems)) == len(stems):
        return {str(query): query.stem for query in queries}
    resolved = [query.resolve() for query in queries]
    root = Path(os.path.commonpath([query.parent for query in resolved]))
    return {
        str(query): str(path.relative_to(root).with_suffix(""))
        for query, path in zip(queries, resolved, strict=True)
    }


def check_apart(output_dir: Path, queries: Sequence[Path], names: dict[str, str]) -> None:
    """Refuse to write predictions into a folder holding queries (a mask ``<stem>.png`` would
    replace a query of that name, and the inputs would mix with the outputs)."""
    inputs = {query.resolve().parent for query in queries}
    targets = {(output_dir / name).resolve().parent for name in names.values()}
    shared = sorted(str(folder) for folder in inputs & targets)
    if shared:
        raise ValueError(
            f"--prediction_writer.output_dir {str(output_dir)!r} would write predictions into "
            f"{shared[0]}, which holds predict queries; choose a folder apart from the inputs"
        )


class MaskWriter(BasePredictionWriter):
    """Saves ``<output_dir>/<name>.png`` (palette PNG, 0 background, 1 foreground) and
    ``<name>_overlay.jpg`` (the query with the foreground tinted) for every query, ``name``
    its file stem, or its relative path where stems repeat (:func:`output_names`); a folder
    holding queries is refused before predicting. A subclass writing other label maps sets
    the ``palette`` (each label's colour, in the PNG and the overlay) and the predictions'
    ``key``.

    Args:
        output_dir: folder for the outputs; created if missing, checked writable before predicting.
        alpha: opacity of the overlay tint.
    """

    palette: ClassVar[Sequence[int]] = PALETTE
    key: ClassVar[str] = "masks"

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
        colours = np.array(self.palette, dtype=np.float32).reshape(256, 3)
        for query_id, path, label in zip(
            prediction["query_id"], prediction["query_path"], prediction[self.key], strict=True
        ):
            label = label.numpy().astype(np.uint8)
            png = Image.fromarray(label, mode="P")
            png.putpalette(list(self.palette))
            name = self.output_dir / self.names.get(str(path), query_id)
            name.parent.mkdir(parents=True, exist_ok=True)
            png.save(name.with_name(f"{name.name}.png"))
            image = open_image(Path(path)).astype(np.float32)  # as shown, as the prediction
            tint = (label > 0)[..., None] * self.alpha
            overlay = image * (1 - tint) + colours[label] * tint
            Image.fromarray(overlay.round().astype(np.uint8)).save(
                name.with_name(f"{name.name}_overlay.jpg"), quality=95
            )
