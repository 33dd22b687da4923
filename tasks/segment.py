"""Few-shot segmentation: ``python -m tasks.segment fit|validate|test|predict``.

A task in torchgeo's style: a LightningModule with ``configure_models``, ``configure_losses`` and
``configure_metrics``, fed by the episodic datamodules of :mod:`datamodules` (batch contract in
:mod:`datamodules.episode`). The backbone is any :class:`backbones.Backbone`; the head any of
:mod:`tasks.heads`. Evaluation scores at the query's original label resolution, as PFENet/ASGNet
(``ori_resize``), with :class:`tasks.metrics.FewShotIoU`.
"""

# No ``from __future__ import annotations``: the ranges must reach jsonargparse
# (datamodules.bounds).
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jsonargparse import lazy_instance
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import Backbone, ResNet
from backbones.protocol import class_path
from datamodules.bounds import BelowOne, NonNegativeFloat, PositiveFloat, check_bounds
from datamodules.episode import input_dtype, to_model_inputs
from datamodules.source import IGNORE
from tasks.base import BaseTask, Optimizer, check_arguments, describe_head, optimizer_checks
from tasks.callbacks.results import summarise
from tasks.heads import FewShotHead, HeadOutput, PrototypeHead
from tasks.heads.common import foreground_masks
from tasks.heads.official import HeadFactory, official_model
from tasks.metrics import FewShotIoU
from tasks.scoring import (
    LOSS_REDUCTIONS,
    original_resolution_predictions,
    original_size_predictions,
    upsample,
)

if TYPE_CHECKING:
    from tasks.cli import TaskCLI


#: The default experiment's encoder: ResNet-18 at output stride 8 (torchvision dilation).
DEFAULT_ENCODER = {"arch": "resnet18", "output_stride": 8}

#: The signature's default, which the command line shows and overrides field by field
#: (``--model.backbone.init_args.weights``); each model builds its own encoder from it.
DEFAULT_BACKBONE = lazy_instance(ResNet, **DEFAULT_ENCODER)


class LossTerms(NamedTuple):
    """The training loss and its terms (``aux``: the mean auxiliary loss, ``None`` without)."""

    total: Tensor
    main: Tensor
    aux: Tensor | None


def scored_logits(output: HeadOutput) -> Tensor:
    """What evaluation predicts from: the head's ``shot_logits`` when it sets them, else its
    ``logits``."""
    return output.logits if output.shot_logits is None else output.shot_logits


def compile_unsupported_reason() -> str | None:
    """Why ``torch.compile`` cannot run here (``None`` if it can): TorchDynamo must support this
    Python/platform, and Inductor's CPU code needs a C++ compiler."""
    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support Python {sys.version.split()[0]} on {sys.platform}"
    compiler = os.environ.get("CXX", "c++")
    if not torch.cuda.is_available() and shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH for Inductor's CPU backend (set CXX)"
    return None


class FewShotSegmentation(BaseTask):
    """Predict the query mask of the support's class from K annotated support images.

    The defaults are the default experiment (``python -m tasks.segment fit``); a checkpoint
    stores the backbone's and the head's class paths and arguments, so it alone rebuilds the
    model (``load_from_checkpoint(path)``, ``test --ckpt_path path``).

    Args:
        backbone: the encoder (any :class:`backbones.Backbone`); default ResNet-18 at output
            stride 8 (:data:`DEFAULT_ENCODER`).
        head: a head class (or callable) taking the backbone's channels by output name; the
            head's ``in_features`` say which outputs the backbone computes (see
            :mod:`tasks.heads`).
        num_classes: classes of the dataset, for per-class IoU (linked from the datamodule).
        freeze_backbone: no gradients in the backbone, BatchNorm kept in eval mode and the
            backbone run under ``torch.no_grad`` (PFENet/ASGNet); else it is fine-tuned at
            ``lr * backbone_lr_mult``. Default: fine-tuned, frozen with ``official_checkpoint``.
        optimizer: ``"sgd"`` (the reference recipes), ``"nesterov"`` (SGD with Nesterov
            momentum: DCAMA) or ``"adamw"``.
        lr, momentum, weight_decay: optimizer settings (ASGNet PASCAL: 0.025, 0.9, 1e-4).
        poly_power: learning rate ``lr * (1 - k / T) ** poly_power`` set before optimizer step
            ``k = 1 .. T`` (:func:`tasks.base.poly_factor`).
        backbone_lr_mult: the backbone's learning-rate multiplier when fine-tuned.
        official_checkpoint: a released PFENet, ASGNet, HSNet or BAM model: its encoder and
            head replace ``backbone`` and ``head``
            (:func:`tasks.heads.official.official_model`), frozen as in the papers.
        official_trusted: unpickle ``official_checkpoint`` fully (only a file you trust).
        channels_last: keep weights and images in channels-last memory order (faster
            convolutions with tensor cores and on recent CPUs); results are unchanged.
        compile: ``torch.compile`` the backbone and the head in place (state-dict keys and
            checkpoints unchanged); where the platform cannot compile, a warning says why and
            the model runs eagerly.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        head: HeadFactory = PrototypeHead,
        num_classes: int = 20,
        freeze_backbone: bool | None = None,
        optimizer: Optimizer = "sgd",
        lr: PositiveFloat = 0.01,
        momentum: BelowOne = 0.9,
        weight_decay: NonNegativeFloat = 1e-4,
        poly_power: NonNegativeFloat = 0.9,
        backbone_lr_mult: PositiveFloat = 1.0,
        official_checkpoint: str | None = None,
        official_trusted: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_bounds(FewShotSegmentation.__init__, locals())
        check_arguments(optimizer_checks(optimizer, momentum))
        self.save_hyperparameters(ignore=["backbone", "head"])
        self.backbone_norm = "frozen"
        #: the released file the weights came from (results name it; the hyper-parameters
        #: forget it, as the checkpoints hold its tensors)
        self.released_file = Path(official_checkpoint) if official_checkpoint else None
        if official_checkpoint is not None:
            backbone, head = official_model(official_checkpoint, official_trusted, head)
        if backbone is DEFAULT_BACKBONE:  # the shared default object must not be shared
            backbone = ResNet(**DEFAULT_ENCODER)
        self.configure_models(backbone, head)
        # The checkpoint holds the official tensors: reloading needs neither the file nor it.
        self.save_description(
            head=describe_head(self.head), official_checkpoint=None, official_trusted=False
        )
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self, backbone: Backbone, head: HeadFactory | nn.Module) -> None:
        """The head (a :class:`~tasks.heads.FewShotHead`) is built on the description of all
        the backbone's outputs (or given built) and prepares the encoder it runs on; the
        backbone then computes only the head's ``in_features``, the modules after them idle
        and without gradient (DDP would flag them unused)."""
        built = head if isinstance(head, nn.Module) else head(backbone.output_info)
        if not isinstance(built, FewShotHead):
            raise TypeError(
                f"head {class_path(built)} is not a tasks.heads.FewShotHead: derive it from "
                "tasks.heads.FewShotHead, the contract the task relies on (README, 'Your own "
                "head or encoder')"
            )
        self.head = built
        self.backbone = self.head.prepare_backbone(backbone)
        self.apply_freezing()
        in_features = self.head.in_features
        if not in_features:
            raise ValueError(
                f"head {type(self.head).__name__} declares no in_features; expected the names "
                f"of the backbone outputs it reads, among {list(backbone.output_info)}"
            )
        frozen = []
        mask_at = self.support_mask_at
        if mask_at is not None:  # the stages after it run without gradient (tasks.heads)
            if not self.backbone.resumable:
                raise ValueError(
                    f"head {type(self.head).__name__} multiplies the support's {mask_at!r} by "
                    f"its mask and runs the encoder on (support_mask_at), which "
                    f"this {type(self.backbone).__name__} cannot (Backbone.resumable is false); "
                    "expected an encoder whose forward_from resumes from an output (a timm ViT "
                    "without final_norm does)"
                )
            order = list(backbone.output_info)
            if mask_at not in in_features:
                raise ValueError(
                    f"head {type(self.head).__name__}: support_mask_at={mask_at!r} is not "
                    f"among its in_features {list(in_features)}"
                )
            self.backbone.select_outputs(
                [name for name in in_features if order.index(name) <= order.index(mask_at)]
            )
            frozen = list(self.backbone.idle_stages())
        self.backbone.select_outputs(in_features)
        for stage in [*self.backbone.idle_stages(), *frozen]:
            stage.requires_grad_(False)
        if self.hparams.freeze_backbone:  # the task's guarantee, with :meth:`train`
            self.backbone.requires_grad_(False)
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            reason = compile_unsupported_reason()
            if reason:
                warnings.warn(f"model.compile ignored, running eagerly: {reason}", stacklevel=2)
            else:
                self.backbone.compile()
                self.head.compile()

    def apply_freezing(self) -> None:
        """Resolve ``freeze_backbone``: unset, frozen for a released model or a head that
        requires it; ``false`` with such a head is refused."""
        required = self.head.requires_frozen_backbone
        if self.hparams.freeze_backbone is None:
            frozen = self.hparams.official_checkpoint is not None or required
            self.hparams.freeze_backbone = frozen
        elif required and not self.hparams.freeze_backbone:
            raise ValueError(
                f"model.freeze_backbone=false: {type(self.head).__name__} requires a frozen "
                "encoder (requires_frozen_backbone: what it reads was trained on that encoder); "
                "leave model.freeze_backbone unset"
            )

    def configure_losses(self) -> None:
        """The protocol's ``loss_reduction`` (set again at ``setup``): the episode mean of the
        clean protocol, or the papers' pixel mean (:data:`LOSS_REDUCTIONS`)."""
        self.loss_reduction = "episodes"
        self.criterion = LOSS_REDUCTIONS[self.loss_reduction]
        #: the optimizer step's labelled pixels so far, and its batches' pixel count
        self._step_labelled: Tensor | None = None
        self._batch_pixels: int | None = None

    def configure_metrics(self) -> None:
        """Train and validation IoU; the test metrics, one per test seed, at test start."""
        self.train_iou = FewShotIoU(self.hparams.num_classes, check_values=False)
        self.val_iou = FewShotIoU(self.hparams.num_classes)
        self.test_ious = nn.ModuleList()

    @property
    def backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def forward(
        self,
        query_image: Tensor,
        support_images: Tensor,
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> Any:
        """Query and support go through the backbone in one batched call; under PFENet's
        BatchNorm recipe (:attr:`backbone_batch_statistics`) in one call per group, query first,
        then each shot, as PFENet's forward does, so batch statistics are those of each group.
        ``class_ids`` [B]: each episode's dataset class, passed on to the head."""
        batch, shots = support_images.shape[:2]
        per_shot = self.backbone_batch_statistics and self.training
        if per_shot:
            groups = list(zip(support_images.unbind(1), support_masks.unbind(1), strict=True))
        else:
            groups = [(support_images.flatten(0, 1), support_masks.flatten(0, 1))]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trainable):
            query, *shot_outputs = [
                self._encode(self._memory_format(images), masks)
                for images, masks in [(query_image, None), *groups]
            ]
        if per_shot:
            support = {name: torch.stack([o[name] for o in shot_outputs], 1) for name in query}
        else:
            support = {name: f.unflatten(0, (batch, shots)) for name, f in shot_outputs[0].items()}
        return self.head(query, support, support_masks, class_ids=class_ids)

    @property
    def support_mask_at(self) -> str | None:
        """The head's ``support_mask_at`` (:class:`~tasks.heads.FewShotHead`)."""
        return self.head.support_mask_at

    def _encode(self, images: Tensor, masks: Tensor | None) -> dict[str, Tensor]:
        """Backbone outputs; for a head with ``support_mask_at``, the outputs after it are
        computed without gradient from that output, multiplied by the foreground of ``masks``
        [N, H, W] for support images (``None`` for queries), as PFENet's
        ``self.layer4(supp_feat_3*mask)``."""
        mask_at = self.support_mask_at
        if mask_at is None:
            return self.backbone(images)
        feats = self.backbone.forward_from(None, images, until=mask_at)
        x = feats[mask_at]
        if masks is not None:
            x = x * foreground_masks(masks[:, None], x.shape[-2:]).to(x.dtype)
        with torch.no_grad():
            return {**feats, **self.backbone.forward_from(mask_at, x)}

    def _memory_format(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def backbone_batch_statistics(self) -> bool:
        """Whether the backbone's BatchNorm trains with batch statistics though the backbone is
        frozen: the datamodule's ``backbone_norm: batch`` (PFENet/ASGNet call ``model.train()``
        on the whole model and only stop the backbone's gradients)."""
        return self.backbone_norm == "batch" and self.hparams.freeze_backbone

    def setup(self, stage: str) -> None:
        """Read the protocol's training recipe from the datamodule (the backbone's BatchNorm,
        the loss reduction), hand the datamodule to the head (:meth:`~tasks.heads.FewShotHead.
        setup`) and apply the modes (the loops keep each module's mode as they find it)."""
        datamodule = self.trainer.datamodule
        protocol = getattr(datamodule, "protocol", None) or {}
        self.backbone_norm = protocol.get("backbone_norm", "frozen")
        self.loss_reduction = protocol.get("loss_reduction", "episodes")
        self.criterion = LOSS_REDUCTIONS[self.loss_reduction]
        self.head.setup(datamodule)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FewShotSegmentation":
        """As :meth:`nn.Module.train`; a frozen backbone stays wholly in eval mode whatever the
        encoder's own ``train()`` does (normalisation statistics and dropout fixed, so any
        encoder stays bit-identical), except its BatchNorm under
        :attr:`backbone_batch_statistics`, which follows ``mode`` (PFENet's ``model.train()``)."""
        super().train(mode)
        if mode and self.hparams.freeze_backbone:
            self.backbone.eval()
            if self.backbone_batch_statistics:
                for module in self.backbone.modules():
                    if isinstance(module, _BatchNorm):
                        module.train()
        return self

    def on_train_start(self) -> None:
        """No pixel count of an earlier, interrupted fit carries into this one's first step."""
        self._step_labelled, self._batch_pixels = None, None

    def on_fit_start(self) -> None:
        """A head that cannot be trained as it is stops here
        (:meth:`~tasks.heads.FewShotHead.check_ready_to_fit`); parameter counts into every
        logger's hyper-parameters (the W&B run's config)."""
        self.head.check_ready_to_fit()
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("total", self), ("backbone", self.backbone), ("head", self.head))
        }
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        for logger in self.loggers:
            logger.log_hyperparams({"parameters": counts})

    def loss(self, output: HeadOutput, target: Tensor) -> LossTerms:
        """The head's cross-entropy under the protocol's reduction (:data:`LOSS_REDUCTIONS`),
        each logit map upsampled to the label, plus ``aux_weight`` times the mean of its
        auxiliary losses (PFENet's ``main_loss + aux_weight * aux_loss``)."""
        size = target.shape[-2:]
        main = self.criterion(upsample(output.logits, size).float(), target)
        if not output.aux_logits:
            return LossTerms(main, main, None)
        aux = torch.stack(
            [self.criterion(upsample(a, size).float(), target) for a in output.aux_logits]
        ).mean()
        return LossTerms(main + output.aux_weight * aux, main, aux)

    def segment(self, batch: Mapping[str, Any]) -> HeadOutput:
        """The head's output for a batch in the :mod:`datamodules.episode` format, as a loader
        gives it (``uint8``) or converted (:func:`~datamodules.episode.to_model_inputs`)."""
        keys = ("query_image", "support_images", "support_masks")
        inputs = to_model_inputs({key: batch[key] for key in keys}, input_dtype(self))
        return self(
            inputs["query_image"],
            inputs["support_images"],
            inputs["support_masks"],
            class_ids=batch.get("class_id"),
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        output = self.segment(batch)
        terms = self.loss(output, batch["query_mask"])
        self.check_finite(terms.total)
        size = batch["query_mask"].shape[-2:]
        self.train_iou.update(
            upsample(output.logits.detach(), size).argmax(1), batch["query_mask"], batch["class_id"]
        )
        batch_size = batch["query_image"].shape[0]
        values = {"loss": terms.total, "main_loss": terms.main, "aux_loss": terms.aux}
        values = {name: value for name, value in values.items() if value is not None}
        if self.loss_reduction == "episodes":
            # averaged over the ranks' equal batches: the loss of the global batch
            for name, value in values.items():
                self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size,
                         sync_dist=True)  # fmt: skip
            return terms.total
        labelled = self._labelled_pixels(batch["query_mask"])
        # the ranks' pixel sums over their labelled pixels: the global batch's pixel mean; the
        # labelled count, summed over the step's batches, also serves the gradients' rescaling
        sums = torch.stack([*(v.detach().float() * labelled for v in values.values()), labelled])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        step = self._step_labelled
        self._step_labelled = sums[-1] if step is None else step + sums[-1]
        for name, value in zip(values, sums[:-1] / sums[-1].clamp(min=1), strict=True):
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return terms.total * (labelled / batch["query_mask"].numel()).to(terms.total.dtype)

    def _labelled_pixels(self, target: Tensor) -> Tensor:
        """The batch's labelled pixels (float32); every batch of an optimizer step must have one
        size ``P`` for :meth:`on_before_optimizer_step` (the step's loss, the pixel mean times
        labelled / ``P``, is the pixel sum / ``P``)."""
        pixels = target.numel()
        if self._batch_pixels is None:
            self._batch_pixels = pixels
        elif pixels != self._batch_pixels:
            raise ValueError(
                f"loss_reduction 'pixels' needs training batches of one size within an optimizer "
                f"step; got {tuple(target.shape)} after batches of {self._batch_pixels} pixels "
                "(data.protocol's presets crop to data.image_size)"
            )
        return (target != IGNORE).sum().float()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under the ``pixels`` reduction, the accumulated gradients (each batch's pixel sum
        over its size ``P``, divided by the accumulated batches ``A`` and averaged over the
        ``W`` devices) times ``W A P / N``, ``N`` the labelled pixels of the global batch (summed
        by the all-reduce of each batch's logged losses): the gradient of the mean over all of
        them, as one device running the whole batch computes it (PFENet's criterion), whatever
        the device count. ``P`` is the same on every rank: ``global_batch_size`` splits evenly
        and the presets crop to one size.
        Callbacks' own ``on_before_optimizer_step`` run before this hook, so they see the
        gradients before the rescaling; clipping runs after it."""
        if self._step_labelled is None:
            return
        trainer = self.trainer
        size = trainer.world_size * trainer.accumulate_grad_batches * self._batch_pixels
        scale = (size / self._step_labelled.clamp(min=1)).float()
        self._step_labelled, self._batch_pixels = None, None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        if grads:
            torch._foreach_mul_(grads, scale)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_iou("train", self.train_iou)

    def _evaluate(self, batch: Mapping[str, Any], metric: FewShotIoU) -> Tensor:
        logits = scored_logits(self.segment(batch))
        predictions = original_resolution_predictions(logits, batch)
        metric.update(predictions, batch["query_label"], batch["class_id"])
        return logits

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """The scored logits (:func:`scored_logits`) go to callbacks
        (:class:`tasks.callbacks.visualise.LogValidationEpisodes`)."""
        return self._evaluate(batch, self.val_iou)

    def on_validation_epoch_end(self) -> None:
        self._log_iou("val", self.val_iou)

    def on_test_start(self) -> None:
        """One metric per test loader (the datamodule gives one loader per test seed), each
        averaging over the fold's novel classes, as every reference does."""
        count = len(self.trainer.test_dataloaders)
        classes = getattr(self.trainer.datamodule, "novel_classes", None)
        metrics = [FewShotIoU(self.hparams.num_classes, classes) for _ in range(count)]
        self.test_ious = nn.ModuleList(metrics).to(self.device)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, self.test_ious[dataloader_idx])

    def on_test_epoch_end(self) -> None:
        """Per seed results into ``test_results`` (written by
        :class:`tasks.callbacks.results.TestResults`); ``test/miou`` and the others logged as
        means over the seeds, with their std."""
        seeds = getattr(self.trainer.datamodule, "test_seeds", range(len(self.test_ious)))
        self.test_results = [
            {"seed": seed, **self._iou_summary(metric)}
            for seed, metric in zip(seeds, self.test_ious, strict=True)
        ]
        summary = summarise(self.test_results)
        for key in ("miou", "fbiou"):
            self.log(f"test/{key}", summary[f"{key}_mean"])
            if len(self.test_results) > 1:
                self.log(f"test/{key}_std", summary[f"{key}_std"])
        for name, iou in summary["iou_per_class_mean"].items():
            self.log(f"test/iou/{name}", iou)

    def _iou_summary(self, metric: FewShotIoU) -> dict[str, Any]:
        """mIoU and FB-IoU over all ranks' episodes (the metric syncs its sums), and the IoU of
        each class that had episodes."""
        result = metric.compute()
        metric.reset()
        names = self.class_names()
        per_class = {
            names[index]: iou
            for index, iou in enumerate(result["iou_per_class"].tolist())
            if iou == iou  # classes without episodes are NaN
        }
        return {
            "miou": result["miou"].item(),
            "fbiou": result["fbiou"].item(),
            "iou_per_class": per_class,
        }

    def _log_iou(self, stage: str, metric: FewShotIoU) -> None:
        summary = self._iou_summary(metric)
        self.log(f"{stage}/miou", summary["miou"], prog_bar=stage != "train")
        self.log(f"{stage}/fbiou", summary["fbiou"])
        for name, iou in summary["iou_per_class"].items():
            self.log(f"{stage}/iou/{name}", iou)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Foreground masks at each query's original size, with the batch's ids."""
        output = self.segment(batch)
        predictions = original_size_predictions(scored_logits(output), batch)
        masks = [p.to(torch.uint8).cpu() for p in predictions]
        return {"query_id": batch["query_id"], "query_path": batch["query_path"], "masks": masks}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.head.param_groups(hp.lr)
        if self.backbone_trainable:
            backbone = [p for p in self.backbone.parameters() if p.requires_grad]
            groups.append({"params": backbone, "lr": hp.lr * hp.backbone_lr_mult})
        return self.optimization(groups, "poly")


def main(args: list[str] | None = None) -> "TaskCLI":
    """The command line; ``args`` lets tests run it in-process and read the CLI's trainer."""
    from datamodules import FewShotDataModule
    from tasks.callbacks.predictions import MaskWriter
    from tasks.callbacks.results import TestResults
    from tasks.cli import run_cli

    return run_cli(
        FewShotSegmentation,
        FewShotDataModule,
        "segment",
        args,
        callbacks={"prediction_writer": MaskWriter, "results": TestResults},
    )


if __name__ == "__main__":
    main()
