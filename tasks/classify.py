"""Image classification: ``python -m tasks.classify fit|validate|test|predict``.

The same conventions as :mod:`tasks.segment` (torchgeo-style ``configure_*`` methods, one
LightningCLI), fed by :mod:`datamodules.classification`. The encoder attribute is ``backbone``, so
a checkpoint of this task loads as segmentation backbone weights
(``--model.backbone.init_args.weights path/to/last.ckpt``): pretrain here, then few-shot.
"""

# No ``from __future__ import annotations``: the ranges must reach jsonargparse
# (datamodules.bounds).
import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from jsonargparse import lazy_instance
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones import Backbone, ResNet
from datamodules.bounds import BelowOne, NonNegativeFloat, PositiveFloat, check_bounds
from datamodules.files import writable_output
from tasks.base import BaseTask, Optimizer, Schedule, check_arguments, optimizer_checks

if TYPE_CHECKING:
    from tasks.cli import TaskCLI

#: The default experiment's encoder: a plain ResNet-18 (output stride 32), small enough to train
#: on a CPU; the signature's default, which each model builds afresh.
DEFAULT_BACKBONE = lazy_instance(ResNet, arch="resnet18")


class ImageClassification(BaseTask):
    """Classify images with an encoder: global average pooling of its deepest stage, dropout,
    linear.

    The defaults are the default experiment's model (``python -m tasks.classify fit``); a
    checkpoint stores the backbone's class path and arguments, so it alone rebuilds the model.

    Args:
        backbone: the encoder; default a ResNet-18 (:data:`DEFAULT_BACKBONE`). Any
            :class:`backbones.Backbone` works (dilated ones too: pooling removes the stride).
        num_classes: classes of the dataset (linked from the datamodule).
        dropout: dropout probability before the linear layer.
        label_smoothing: cross-entropy label smoothing (Szegedy et al., 2016: 0.1).
        optimizer: ``"sgd"`` (with ``momentum``), ``"nesterov"`` (SGD with Nesterov momentum)
            or ``"adamw"``.
        lr, momentum, weight_decay: optimizer settings.
        schedule: ``"cosine"`` or ``"poly"`` decay to 0 over the run, per step.
        poly_power: exponent of the poly schedule.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        num_classes: int = 1000,
        dropout: BelowOne = 0.1,
        label_smoothing: BelowOne = 0.1,
        optimizer: Optimizer = "adamw",
        lr: PositiveFloat = 0.001,
        momentum: BelowOne = 0.9,
        weight_decay: NonNegativeFloat = 0.05,
        schedule: Schedule = "cosine",
        poly_power: NonNegativeFloat = 0.9,
    ) -> None:
        super().__init__()
        check_bounds(ImageClassification.__init__, locals())
        check_arguments(
            (
                ("num_classes", num_classes, num_classes >= 2, "an integer >= 2"),
                *optimizer_checks(optimizer, momentum),
                ("schedule", schedule, schedule in get_args(Schedule), str(get_args(Schedule))),
            )
        )
        self.save_hyperparameters(ignore=["backbone"])
        if backbone is DEFAULT_BACKBONE:  # the shared default object must not be shared
            backbone = ResNet("resnet18")
        self.configure_models(backbone)
        self.save_description()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self, backbone: Backbone) -> None:
        """The classifier reads the deepest stage's output, whatever the encoder names it."""
        self.backbone = backbone
        deepest = backbone.output_info.stage(-1)
        self.feature = deepest.name
        self.backbone.select_outputs([deepest.name])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(self.hparams.dropout),
            nn.Linear(deepest.channels, self.hparams.num_classes),
        )

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)

    def configure_metrics(self) -> None:
        """Top-1 and (with at least 5 classes) top-5 accuracy over samples, per-class accuracy."""
        classes = self.hparams.num_classes
        metrics = {"acc1": MulticlassAccuracy(classes, top_k=1, average="micro")}
        if classes >= 5:
            metrics["acc5"] = MulticlassAccuracy(classes, top_k=5, average="micro")
        self.train_metrics = MetricCollection(metrics, prefix="train/")
        self.val_metrics = self.train_metrics.clone(prefix="val/")
        self.test_metrics = self.train_metrics.clone(prefix="test/")
        self.val_class_accuracy = MulticlassAccuracy(classes, average="none")

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.backbone(images)[self.feature])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["label"])
        self.check_finite(loss)
        batch_size = len(batch["label"])
        self.train_metrics(logits.detach(), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(self.train_metrics, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str, metrics: MetricCollection) -> Tensor:
        logits = self(batch["image"])
        batch_size = len(batch["label"])
        loss = self.criterion(logits, batch["label"])
        metrics.update(logits, batch["label"])
        self.log(f"{stage}/loss", loss, batch_size=batch_size)
        # Metric objects: Lightning computes (and syncs across ranks) them at epoch end.
        self.log_dict(metrics, prog_bar=True, batch_size=batch_size)
        return logits

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        logits = self._evaluate(batch, "val", self.val_metrics)
        self.val_class_accuracy.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        """Per-class accuracy, named after the datamodule's classes."""
        accuracy = self.val_class_accuracy.compute()
        self.val_class_accuracy.reset()
        for name, value in zip(self.class_names(), accuracy.tolist(), strict=True):
            self.log(f"val/acc_class/{name}", value)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Each image's id, most probable class and its softmax probability."""
        probability, predicted = self(batch["image"]).softmax(1).max(1)
        return {"id": batch["id"], "class": predicted.tolist(), "probability": probability.tolist()}

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return self.optimization(params, self.hparams.schedule)


class PredictionCSV(BasePredictionWriter):
    """Writes ``file,class,probability`` per image to ``output_file`` as batches arrive.

    Under DDP each rank writes its own ``<stem>.rank<r>.csv``.

    Args:
        output_file: the CSV path; its folder is created if missing.
    """

    def __init__(self, output_file: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file)

    def path(self, trainer: Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output_file
        return self.output_file.with_suffix(f".rank{trainer.global_rank}.csv")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.path(trainer)
        with writable_output(path, "--prediction_writer.output_file"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as file:
                csv.writer(file).writerow(["file", "class", "probability"])

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
        names = pl_module.class_names()
        rows = zip(prediction["id"], prediction["class"], prediction["probability"], strict=True)
        with self.path(trainer).open("a", newline="") as file:
            csv.writer(file).writerows(
                (name, names[cls], f"{prob:.6f}") for name, cls, prob in rows
            )


def main(args: list[str] | None = None) -> "TaskCLI":
    """The command line; ``args`` lets tests run it in-process and read the CLI's trainer."""
    from datamodules import ClassificationDataModule
    from tasks.cli import run_cli

    return run_cli(
        ImageClassification,
        ClassificationDataModule,
        "classify",
        args,
        callbacks={"prediction_writer": PredictionCSV},
    )


if __name__ == "__main__":
    main()
