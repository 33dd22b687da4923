"""Semantic segmentation, the base learner of BAM: ``python -m tasks.semantic fit|validate|test|
predict``.

The same conventions as :mod:`tasks.segment` and :mod:`tasks.classify` (``configure_*`` methods,
one LightningCLI, self-describing checkpoints), fed by :mod:`datamodules.semantic`. The model is
any :class:`backbones.Backbone` and a decoder (default :class:`tasks.decoders.PSPDecoder`,
PSPNet's pyramid pooling and classifier as BAM's ``model/PSPNet.py``), trained with cross-entropy
ignoring 255 and SGD with a poly schedule, scored by :class:`SemanticIoU`. With ``fold=k`` the
data are the base classes of a few-shot fold, so a checkpoint is the base learner that BAM
(Lang et al., CVPR 2022, chunbolang/BAM) and its descendants freeze; BAM's released base
learners load with ``--model.official_checkpoint`` (:func:`official_base_learner`).
"""

# No ``from __future__ import annotations``: the ranges must reach jsonargparse
# (datamodules.bounds).
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse import lazy_instance
from torch import Tensor, nn

from backbones import Backbone, FeaturePyramid, ResNet, WeightsError
from backbones.weights import checkpoint_arch, read_checkpoint, to_native
from datamodules.bounds import BelowOne, NonNegativeFloat, PositiveFloat, check_bounds
from datamodules.episode import input_dtype, to_model_inputs
from tasks.base import BaseTask, Optimizer, check_arguments, describe_head, optimizer_checks
from tasks.decoders import DECODER_PREFIXES, PSPDecoder
from tasks.heads.official import split_official_state_dict
from tasks.metrics import SemanticIoU
from tasks.scoring import (
    episode_mean_cross_entropy,
    original_resolution_predictions,
    original_size_predictions,
    upsample,
)

if TYPE_CHECKING:
    from tasks.cli import TaskCLI

DecoderFactory = Callable[[FeaturePyramid, int], nn.Module]

#: The PSPNet encoder of BAM's base learner (``model/PSPNet.py``): ResNet-50, deep stem, every
#: block of layer3/layer4 dilated 2/4 (uniform), output stride 8.
PSPNET_ENCODER = {"arch": "resnet50", "stem": "deep", "output_stride": 8,
                  "dilation_scheme": "uniform"}  # fmt: skip

#: The signature's default (overridden field by field on the command line); each model builds
#: its own encoder from it.
DEFAULT_BACKBONE = lazy_instance(ResNet, **PSPNET_ENCODER)

#: BAM's base learner file stores every encoder tensor twice: as ``layer<i>.`` and as
#: ``encoder.<i>.`` (its ``nn.Sequential(layer0, ..., layer4)``, registered after them).
DUPLICATE_PREFIX = "encoder."


def official_base_learner(
    path: str, num_classes: int, trusted: bool = False, decoder: DecoderFactory | None = None
) -> tuple[ResNet, nn.Module]:
    """The encoder and decoder of one of BAM's base learners
    (``initmodel/PSPNet/<dataset>/split<k>/resnet50/best.pth``: ``{'epoch', 'state_dict',
    'optimizer'}``, ``module.``-prefixed keys of ``model/PSPNet.py``'s ``OneModel``).

    ``layer0.*`` .. ``layer4.*`` load strictly into a PSPNet encoder of the depth the file holds
    (:data:`PSPNET_ENCODER`, through the backbone's own weights loader); ``ppm.*`` and
    ``cls.*`` strictly into ``decoder`` (when it builds a :class:`PSPDecoder`, else a default
    one) of the file's class count, which must equal ``num_classes``; each ``encoder.<i>.*``
    must repeat its ``layer<i>.*`` tensor. Any other key is an error listing it.
    """
    checkpoint = read_checkpoint(path, trusted, option="--model.official_trusted true")
    others, encoder = split_official_state_dict(checkpoint)
    duplicates = {k: v for k, v in others.items() if k.startswith(DUPLICATE_PREFIX)}
    decoder_state = {k: v for k, v in others.items() if k.startswith(DECODER_PREFIXES)}
    unexpected = sorted(set(others) - set(duplicates) - set(decoder_state))
    if unexpected or "cls.4.weight" not in decoder_state:
        raise WeightsError(
            f"official_checkpoint={path!r} is not a BAM base learner (model/PSPNet.py: encoder "
            f"layer0..layer4, ppm.*, cls.*): unexpected keys {unexpected[:10]}, decoder keys "
            f"{sorted(decoder_state)[:6]}"
        )
    differing = []
    for key, value in duplicates.items():
        index, rest = key.removeprefix(DUPLICATE_PREFIX).split(".", 1)
        twin = encoder.get(f"layer{index}.{rest}")
        if twin is None or twin.shape != value.shape or not torch.equal(twin, value):
            differing.append(key)
    if differing:
        raise WeightsError(
            f"official_checkpoint={path!r}: {sorted(differing)[:10]} do not repeat their "
            "layer<i>.* tensors (BAM's encoder is nn.Sequential(layer0, ..., layer4))"
        )
    depths, archs = checkpoint_arch(to_native(encoder, is_lightning=False)[0])
    if not archs:
        raise WeightsError(
            f"official_checkpoint={path!r} holds no ResNet encoder this project builds (blocks "
            f"per stage {depths}); expected a BAM ResNet-50/101 base learner"
        )
    classes = decoder_state["cls.4.weight"].shape[0]
    if classes != num_classes:
        raise WeightsError(
            f"official_checkpoint={path!r} predicts {classes} classes but the model has "
            f"num_classes={num_classes} (the data's: a fold's base classes and background, "
            "BAM PASCAL-5i 16, COCO-20i 61); pass the matching --data.fold"
        )
    options = {key: value for key, value in PSPNET_ENCODER.items() if key != "arch"}
    backbone = ResNet(archs[0], **options, weights=path, weights_trusted=trusted)
    built = None if decoder is None else decoder(backbone.output_info, classes)
    model = built if isinstance(built, PSPDecoder) else PSPDecoder(backbone.output_info, classes)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(decoder_state)), sorted(set(decoder_state) - expected)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    mismatched = [k for k in expected & set(decoder_state) if shapes[k] != decoder_state[k].shape]
    if missing or extra or mismatched:
        raise WeightsError(
            f"official_checkpoint={path!r} does not match {type(model).__name__}: missing keys "
            f"{missing}, unexpected keys {extra}, shape mismatches {sorted(mismatched)}"
        )
    model.load_state_dict(decoder_state)
    return backbone, model


class SemanticSegmentation(BaseTask):
    """Label every pixel with one of ``num_classes`` classes (background 0).

    The defaults are BAM's base learner recipe (``model/PSPNet.py``, ``train_base.py``,
    ``config/pascal/pascal_split0_resnet50_base.yaml``): the PSPNet ResNet-50 encoder, PSPNet's
    decoder, SGD lr 2.5e-4 (momentum 0.9, weight decay 1e-4, poly 0.9) with the decoder at 10x
    (``index_split: 0``, ``scale_lr=10``); ``configs/semantic/default.yaml`` sets the CPU
    experiment. A checkpoint stores the backbone's and the decoder's class paths and arguments,
    so it alone rebuilds the model.

    The loss is the mean over images of each image's pixel-mean cross-entropy (255 ignored), so
    it does not depend on how a global batch is split over devices
    (:func:`tasks.scoring.episode_mean_cross_entropy`); BAM averages over the pixels of a device
    batch. Logits are upsampled bilinearly (``align_corners=True``) to the label, as BAM does to
    ``(H - 1) / 8 * 8 + 1``, the input size for its 417/473 crops.

    Args:
        backbone: the encoder; default the PSPNet ResNet-50 (:data:`PSPNET_ENCODER`).
        decoder: a decoder class (or callable) taking the backbone's ``output_info`` and the
            classes (:mod:`tasks.decoders`).
        num_classes: classes with background (linked from the datamodule; BAM PASCAL-5i 16).
        optimizer: ``"sgd"``, ``"nesterov"`` (SGD with Nesterov momentum) or ``"adamw"``.
        lr, momentum, weight_decay, poly_power: optimizer and schedule settings.
        backbone_lr_mult, decoder_lr_mult: learning-rate multipliers of the two parts (BAM
            PASCAL: 1 and 10; COCO, ``index_split: -1``: 10 and 10).
        official_checkpoint: a BAM base learner ``best.pth``: its encoder and decoder replace
            ``backbone`` and ``decoder`` (:func:`official_base_learner`).
        official_trusted: unpickle ``official_checkpoint`` fully (only a file you trust).
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        decoder: DecoderFactory = PSPDecoder,
        num_classes: int = 16,
        optimizer: Optimizer = "sgd",
        lr: PositiveFloat = 2.5e-4,
        momentum: BelowOne = 0.9,
        weight_decay: NonNegativeFloat = 1e-4,
        poly_power: NonNegativeFloat = 0.9,
        backbone_lr_mult: PositiveFloat = 1.0,
        decoder_lr_mult: PositiveFloat = 10.0,
        official_checkpoint: str | None = None,
        official_trusted: bool = False,
    ) -> None:
        super().__init__()
        check_bounds(SemanticSegmentation.__init__, locals())
        check_arguments(
            (
                ("num_classes", num_classes, num_classes >= 2, "an integer >= 2"),
                *optimizer_checks(optimizer, momentum),
            )
        )
        self.save_hyperparameters(ignore=["backbone", "decoder"])
        if official_checkpoint is not None:
            backbone, decoder = official_base_learner(
                official_checkpoint, num_classes, official_trusted, decoder
            )
        if backbone is DEFAULT_BACKBONE:  # the shared default object must not be shared
            backbone = ResNet(**PSPNET_ENCODER)
        self.configure_models(backbone, decoder)
        # The checkpoint holds the official tensors: reloading needs neither the file nor it.
        self.save_description(
            decoder=describe_head(self.decoder), official_checkpoint=None, official_trusted=False
        )
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self, backbone: Backbone, decoder: DecoderFactory | nn.Module) -> None:
        """The decoder is built on the backbone's outputs (or given built); the backbone then
        computes only its ``in_features``, the stages after them idle without gradient."""
        self.backbone = backbone
        if not isinstance(decoder, nn.Module):
            decoder = decoder(backbone.output_info, self.hparams.num_classes)
        self.decoder = decoder
        self.backbone.select_outputs(self.decoder.in_features)
        for stage in self.backbone.idle_stages():
            stage.requires_grad_(False)

    def configure_losses(self) -> None:
        self.criterion = episode_mean_cross_entropy

    def configure_metrics(self) -> None:
        self.val_iou = SemanticIoU(self.hparams.num_classes)
        self.test_iou = SemanticIoU(self.hparams.num_classes)

    def logits(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes, h, w]`` at the decoder's feature resolution."""
        return self.decoder(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]`` at the input resolution (bilinear,
        ``align_corners=True``: BAM's ``F.interpolate`` to ``(H - 1) / 8 * 8 + 1``)."""
        return upsample(self.logits(images), images.shape[-2:])

    def segment(self, batch: Mapping[str, Any]) -> Tensor:
        """Feature-resolution logits of a batch as a loader gives it (``uint8``) or converted
        (:func:`~datamodules.episode.to_model_inputs`)."""
        inputs = to_model_inputs({"query_image": batch["query_image"]}, input_dtype(self))
        return self.logits(inputs["query_image"])

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.criterion(upsample(logits, target.shape[-2:]).float(), target.long())

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(self.segment(batch), batch["query_mask"])
        self.check_finite(loss)
        batch_size = batch["query_mask"].shape[0]
        # Averaged over the ranks' equal batches: the loss of the global batch.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str, metric: SemanticIoU) -> Tensor:
        logits = self.segment(batch)
        metric.update(original_resolution_predictions(logits, batch), batch["query_label"])
        batch_size = batch["query_mask"].shape[0]
        self.log(f"{stage}/loss", self.loss(logits, batch["query_mask"]), batch_size=batch_size)
        return logits

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """The logits go to callbacks
        (:class:`tasks.callbacks.label_maps.LogValidationLabelMaps`)."""
        return self._evaluate(batch, "val", self.val_iou)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_iou)

    def on_validation_epoch_end(self) -> None:
        self._log_iou("val", self.val_iou)

    def on_test_epoch_end(self) -> None:
        """Also kept as ``test_results`` (mIoUs and the IoU of every class, by name)."""
        self.test_results = self._log_iou("test", self.test_iou)

    def _log_iou(self, stage: str, metric: SemanticIoU) -> dict[str, Any]:
        """``<stage>/miou``, ``/miou_fg``, ``/pixel_acc`` and ``/iou/<class>`` over all ranks'
        images (the metric syncs its sums)."""
        result = metric.compute()
        metric.reset()
        summary = {key: result[key].item() for key in ("miou", "miou_fg", "pixel_acc")}
        for key, value in summary.items():
            self.log(f"{stage}/{key}", value, prog_bar=key != "pixel_acc")
        per_class = {
            name: iou
            for name, iou in zip(self.class_names(), result["iou_per_class"].tolist(), strict=True)
            if iou == iou  # NaN: neither present nor predicted
        }
        for name, iou in per_class.items():
            self.log(f"{stage}/iou/{name}", iou)
        return {**summary, "iou_per_class": per_class}

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class maps at each image's original size, with the batch's ids and paths."""
        predictions = original_size_predictions(self.segment(batch), batch)
        labels = [p.to(torch.uint8).cpu() for p in predictions]
        return {"query_id": batch["query_id"], "query_path": batch["query_path"], "labels": labels}

    def on_fit_start(self) -> None:
        """Parameter counts into every logger's hyper-parameters (the W&B run's config)."""
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (
                ("total", self),
                ("backbone", self.backbone),
                ("decoder", self.decoder),
            )
        }
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        for logger in self.loggers:
            logger.log_hyperparams({"parameters": counts})

    def configure_optimizers(self) -> dict[str, Any]:
        """BAM's ``get_optim``: one SGD over the encoder and the decoder, the decoder's (and on
        COCO the encoder's) learning rate scaled 10x (``poly_learning_rate``'s ``index_split``)."""
        hp = self.hparams
        groups = [
            {"params": [p for p in module.parameters() if p.requires_grad], "lr": hp.lr * mult}
            for module, mult in (
                (self.backbone, hp.backbone_lr_mult),
                (self.decoder, hp.decoder_lr_mult),
            )
        ]
        return self.optimization([g for g in groups if g["params"]], "poly")


def main(args: list[str] | None = None) -> "TaskCLI":
    """The command line; ``args`` lets tests run it in-process and read the CLI's trainer."""
    from datamodules.semantic import SemanticDataModule
    from tasks.callbacks.label_maps import LabelMapWriter
    from tasks.cli import run_cli

    return run_cli(
        SemanticSegmentation,
        SemanticDataModule,
        "semantic",
        args,
        callbacks={"prediction_writer": LabelMapWriter},
    )


if __name__ == "__main__":
    main()
