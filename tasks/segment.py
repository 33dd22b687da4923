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
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

import torch
from jsonargparse import lazy_instance
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import VGG, Backbone, FeaturePyramid, ResNet, WeightsError
from backbones.protocol import build_described
from backbones.vgg import is_vgg_state, vgg_arch
from backbones.weights import checkpoint_arch, read_checkpoint, to_native
from datamodules.bounds import BelowOne, NonNegativeFloat, PositiveFloat, check_bounds
from datamodules.episode import input_dtype, to_model_inputs
from datamodules.source import IGNORE
from tasks.base import BaseTask, Optimizer, check_arguments, describe_head
from tasks.callbacks.results import summarise
from tasks.heads import ASGNetHead, BAMHead, HeadOutput, HSNetHead, PFENetHead, PrototypeHead
from tasks.heads.bam import BaseLearner
from tasks.heads.common import (
    OfficialCheckpoint,
    foreground_masks,
    resize,
    split_official_state_dict,
    vote,
)
from tasks.metrics import FewShotIoU

if TYPE_CHECKING:
    from tasks.cli import TaskCLI

HeadFactory = Callable[[FeaturePyramid], nn.Module]


#: The default experiment's encoder: ResNet-18 at output stride 8 (torchvision dilation).
DEFAULT_ENCODER = {"arch": "resnet18", "output_stride": 8}

#: The signature's default, which the command line shows and overrides field by field
#: (``--model.backbone.init_args.weights``); each model builds its own encoder from it.
DEFAULT_BACKBONE = lazy_instance(ResNet, **DEFAULT_ENCODER)


#: The heads whose authors' released checkpoints ``official_checkpoint`` loads; a file is
#: recognised by a head key only its model holds (``official_signature``).
OFFICIAL_HEADS: tuple[type[OfficialCheckpoint], ...] = (ASGNetHead, PFENetHead, HSNetHead, BAMHead)


def official_model(
    path: str, trusted: bool = False, head: HeadFactory | nn.Module | None = None
) -> tuple[Backbone, nn.Module]:
    """The encoder and head of a released PFENet, ASGNet or HSNet model (``model/PFENet.py``'s
    ``train_epoch_*.pth``, ``model/asgnet.py``'s checkpoint, HSNet's ``best_model.pt``): the
    encoder the file holds in its paper's layout (PSPNet's deep stem, uniform dilation and
    output stride 8, of the file's depth; HSNet's torchvision ResNet at output stride 32;
    PFENet's VGG-16 cut, :class:`backbones.VGG`, for its COCO models), and the head of the
    model the file holds, both loaded strictly from the one file. The head takes the paper's
    options, or those of ``head`` when it builds that same head class (the bins are not in the
    file: PFENet's COCO models use 1.0/0.5/0.25/0.125, set in
    ``configs/segment/pfenet_coco.yaml``).
    """
    checkpoint = read_checkpoint(path, trusted, option="--model.official_trusted true")
    head_state, encoder = split_official_state_dict(checkpoint)
    matches = [cls for cls in OFFICIAL_HEADS if cls.official_signature in head_state]
    if len(matches) != 1:
        expected = {cls.official_paper: cls.official_signature for cls in OFFICIAL_HEADS}
        raise WeightsError(
            f"official_checkpoint={path!r} is not one released model of {list(expected)}: "
            f"expected exactly one of the head keys {expected}, found head keys "
            f"{sorted(head_state)[:10]}"
        )
    head_class = matches[0]
    backbone: Backbone
    if is_vgg_state(encoder):
        backbone = VGG(vgg_arch(encoder), weights=path, weights_trusted=trusted)
    else:
        depths, archs = checkpoint_arch(to_native(encoder, is_lightning=False)[0])
        if not archs:
            raise WeightsError(
                f"official_checkpoint={path!r} holds no encoder this project builds (ResNet "
                f"blocks per stage {depths}); expected a released {head_class.official_paper} "
                "ResNet-50/101 or VGG-16 model"
            )
        backbone = ResNet(
            archs[0], **head_class.official_encoder, weights=path, weights_trusted=trusted
        )
    features = backbone.output_info
    built = head if head is None or isinstance(head, nn.Module) else head(features)
    model_head = built if isinstance(built, head_class) else head_class(features)
    assert isinstance(model_head, OfficialCheckpoint)
    model_head.load_official_state_dict(checkpoint)
    return backbone, model_head


def base_learner_encoder(source: BaseLearner, configured: Backbone) -> Backbone:
    """The configured encoder rebuilt with the base learner file's encoder tensors (its
    ``weights`` option), after checking that a file recording its encoder records this one."""
    description = configured.describe()
    if source.backbone is not None and source.backbone != description:
        raise ValueError(
            f"base_learner={source.path!r} was trained with the encoder {source.backbone}, but "
            f"the model is configured with {description}; configure --model.backbone as the "
            "base learner's"
        )
    init_args = dict(description["init_args"])
    if "weights" not in init_args:
        raise ValueError(
            f"{description['class_path']} has no weights option to load the encoder of "
            f"base_learner={source.path!r} from"
        )
    init_args["weights"] = source.path
    if "weights_trusted" in init_args:
        init_args["weights_trusted"] = source.trusted
    return build_described({**description, "init_args": init_args})


def check_base_learner_split(source: BaseLearner, novel_classes: list[int] | None) -> None:
    """Refuse a base learner trained on another fold's class split (its recorded novel classes
    differ from the data's): it learned some of this fold's novel classes as base classes, which
    would leak into every novel-class prediction. The count check of
    :func:`base_channel_lookup` cannot see it (every PASCAL-5i fold has 15 base classes)."""
    trained = source.data.get("novel_classes")
    if trained is None or novel_classes is None or sorted(trained) == sorted(novel_classes):
        return
    raise ValueError(
        f"base_learner={source.path!r} was trained with fold {source.data.get('fold')!r} "
        f"(novel classes {sorted(trained)}) but the data's novel classes are "
        f"{sorted(novel_classes)}: it has learned some of them as base classes, which would "
        "leak; train the base learner on this fold (python -m tasks.semantic fit --data.fold "
        "<this fold>)"
    )


def base_channel_lookup(base_classes: list[int], num_classes: int, known: int) -> Tensor:
    """[num_classes] long: a fold's base class ``c`` -> its base learner's channel (1 + its rank
    among the base classes, BAM's ``sub_list.index(c) + 1``), 0 for every other class."""
    if len(base_classes) != known:
        raise ValueError(
            f"the head's base learner knows {known} base classes but the data's fold has "
            f"{len(base_classes)}; train the base learner on this dataset and fold"
        )
    lookup = torch.zeros(num_classes, dtype=torch.long)
    lookup[torch.tensor(sorted(base_classes))] = torch.arange(1, known + 1)
    return lookup


class LossTerms(NamedTuple):
    """The training loss and its terms (``aux``: the mean auxiliary loss, ``None`` without)."""

    total: Tensor
    main: Tensor
    aux: Tensor | None


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
    return nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)


#: ``loss_reduction`` of the protocol (:mod:`datamodules.protocols`) -> the batch criterion
LOSS_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "episodes": episode_mean_cross_entropy,
    "pixels": pixel_mean_cross_entropy,
}


def scored_logits(output: HeadOutput) -> Tensor:
    """What evaluation predicts from: the head's ``shot_logits`` when it sets them, else its
    ``logits``."""
    return output.logits if output.shot_logits is None else output.shot_logits


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
        optimizer: ``"sgd"`` (the reference recipes) or ``"adamw"``.
        lr, momentum, weight_decay: optimizer settings (ASGNet PASCAL: 0.0025, 0.9, 1e-4).
        poly_power: learning rate ``lr * (1 - step / total_steps) ** poly_power`` per step.
        backbone_lr_mult: the backbone's learning-rate multiplier when fine-tuned.
        official_checkpoint: a released PFENet, ASGNet or HSNet model: its encoder and head
            replace ``backbone`` and ``head`` (:func:`official_model`), frozen as in the papers.
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
        check_arguments(
            (("optimizer", optimizer, optimizer in get_args(Optimizer), get_args(Optimizer)),)
        )
        self.save_hyperparameters(ignore=["backbone", "head"])
        self.backbone_norm = "frozen"
        if official_checkpoint is not None:
            backbone, head = official_model(official_checkpoint, official_trusted, head)
        needs_frozen = getattr(getattr(head, "func", head), "requires_frozen_backbone", False)
        if freeze_backbone is None:
            freeze_backbone = official_checkpoint is not None or needs_frozen
        elif needs_frozen and not freeze_backbone:
            raise ValueError(
                "model.freeze_backbone=false: the head's base learner reads the encoder it was "
                "trained with, which must stay frozen (BAM); leave model.freeze_backbone unset"
            )
        self.hparams.freeze_backbone = freeze_backbone
        #: dataset class -> the base learner's channel (0: not a base class), from ``setup``
        self.base_channel_of: Tensor | None = None
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
        """The head is built on the description of all the backbone's outputs (or given built);
        the backbone then computes only the head's ``in_features``, the modules after them idle
        and without gradient (DDP would flag them unused)."""
        self.backbone = backbone
        self.head = head if isinstance(head, nn.Module) else head(backbone.output_info)
        source = getattr(self.head, "base_learner_source", None)
        #: the base learner file's record without its tensors, for the split check of setup
        self.base_learner_record = None if source is None else replace(source, decoder={})
        if source is not None:  # the base learner's own encoder (BAM), once
            self.backbone = base_learner_encoder(source, backbone)
            self.head.base_learner_source = None
        in_features = getattr(self.head, "in_features", None)
        if not in_features:
            raise ValueError(
                f"head {type(self.head).__name__} declares no in_features; expected the names "
                f"of the backbone outputs it reads, among {list(backbone.output_info)}"
            )
        frozen = []
        mask_at = self.support_mask_at
        if mask_at is not None:  # the stages after it run without gradient (tasks.heads)
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
        base_channels: Tensor | None = None,
    ) -> Any:
        """Query and support go through the backbone in one batched call; under PFENet's
        BatchNorm recipe (:attr:`backbone_batch_statistics`) in one call per group, query first,
        then each shot, as PFENet's forward does, so batch statistics are those of each group.
        ``base_channels``: each episode's class as its base learner's channel, for a head that
        reads it (BAM)."""
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
        if base_channels is not None:
            return self.head(query, support, support_masks, base_channels=base_channels)
        return self.head(query, support, support_masks)

    @property
    def support_mask_at(self) -> str | None:
        """The head's ``support_mask_at`` (:mod:`tasks.heads`), ``None`` when it has none."""
        return getattr(self.head, "support_mask_at", None)

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
        """Read the protocol's training recipe from the datamodule (the backbone's BatchNorm, the
        loss reduction, a base learner's dropout) and apply it (the loops keep each module's
        mode as they find it)."""
        datamodule = self.trainer.datamodule
        protocol = getattr(datamodule, "protocol", None) or {}
        self.backbone_norm = protocol.get("backbone_norm", "frozen")
        self.loss_reduction = protocol.get("loss_reduction", "episodes")
        self.criterion = LOSS_REDUCTIONS[self.loss_reduction]
        if hasattr(self.head, "base_learner_dropout"):  # BAM's model.train() + fix_bn
            self.head.base_learner_dropout = protocol.get("base_learner_dropout", False)
        base_classes = getattr(datamodule, "base_classes", None)
        if self.base_learner_record is not None:
            novel = getattr(datamodule, "novel_classes", None)
            check_base_learner_split(self.base_learner_record, novel)
        if getattr(self.head, "reads_episode_class", False) and base_classes is not None:
            self.base_channel_of = base_channel_lookup(
                base_classes, self.hparams.num_classes, self.head.num_base_classes
            )
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

    def on_fit_start(self) -> None:
        """Parameter counts into every logger's hyper-parameters (the W&B run's config); a head
        whose base learner holds no trained tensors is refused (BAM without ``base_learner``)."""
        if getattr(self.head, "base_learner_ready", True) is False:
            raise ValueError(
                f"{type(self.head).__name__} has no trained base learner to fit with: pass "
                "--model.head.init_args.base_learner (a tasks.semantic checkpoint of this fold, "
                "or BAM's initmodel/PSPNet/<dataset>/split<k>/<arch>/best.pth)"
            )
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
        channels = None
        if self.base_channel_of is not None and "class_id" in batch:
            channels = self.base_channel_of.to(batch["class_id"].device)[batch["class_id"]]
        return self(
            inputs["query_image"], inputs["support_images"], inputs["support_masks"], channels
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
        labelled = self._count_pixels(batch["query_mask"])
        # the ranks' pixel sums over their labelled pixels: the global batch's pixel mean
        sums = torch.stack([*(v.detach().float() * labelled for v in values.values()), labelled])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for name, value in zip(values, sums[:-1] / sums[-1].clamp(min=1), strict=True):
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return terms.total * (labelled / batch["query_mask"].numel()).to(terms.total.dtype)

    def _count_pixels(self, target: Tensor) -> Tensor:
        """The batch's labelled pixels (float32), added to the optimizer step's count for
        :meth:`on_before_optimizer_step`, which needs every batch of the step to have one size
        ``P`` (the step's loss, the pixel mean times labelled / ``P``, is the pixel sum / ``P``)."""
        pixels = target.numel()
        if self._batch_pixels is None:
            self._batch_pixels = pixels
        elif pixels != self._batch_pixels:
            raise ValueError(
                f"loss_reduction 'pixels' needs training batches of one size within an optimizer "
                f"step; got {tuple(target.shape)} after batches of {self._batch_pixels} pixels "
                "(data.protocol's presets crop to data.image_size)"
            )
        labelled = (target != IGNORE).sum().float()
        self._step_labelled = (
            labelled if self._step_labelled is None else self._step_labelled + labelled
        )
        return labelled

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under the ``pixels`` reduction, the accumulated gradients (each batch's pixel sum
        over its size ``P``, divided by the accumulated batches ``A`` and averaged over the
        ``W`` devices) times ``W A P / N``, ``N`` the labelled pixels of the global batch (one
        all-reduce): the gradient of the mean over all of them, as one device running the whole
        batch computes it (PFENet's criterion), whatever the device count."""
        if self._step_labelled is None:
            return
        labelled = self.trainer.strategy.reduce(self._step_labelled, reduce_op="sum")
        trainer = self.trainer
        size = trainer.world_size * trainer.accumulate_grad_batches * self._batch_pixels
        scale = (size / labelled.clamp(min=1)).float()
        self._step_labelled, self._batch_pixels = None, None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        torch._foreach_mul_([g for g in grads if g is not None], scale)

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
        groups = [{"params": [p for p in self.head.parameters() if p.requires_grad], "lr": hp.lr}]
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
