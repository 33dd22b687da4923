"""Semantic segmentation decoders on one backbone output.

:class:`PSPDecoder` is PSPNet's pyramid pooling module and classifier exactly as BAM's base
learner builds them (chunbolang/BAM ``model/PSPNet.py``, ``model/PPM.py``; hszhao/semseg's
PSPNet without its auxiliary layer3 head), with the same module names, so the ``ppm.*`` and
``cls.*`` tensors of BAM's released ``initmodel/PSPNet/<dataset>/split<k>/resnet50/best.pth``
load into it one to one. It runs on any feature map given to it, so a few-shot head can run a
trained base learner's decoder on its query's layer4 (BAM's ``self.learner_base``).

A decoder follows the heads' contract (:mod:`tasks.heads`): ``decoder(features, num_classes,
**options)`` with ``features`` the encoder's :class:`~backbones.features.FeaturePyramid`,
``decoder(feats) -> [B, num_classes, h, w]`` logits at feature resolution,
``decoder.in_features`` the backbone outputs it reads, ``decoder.init_args`` its options
(recorded by :class:`~backbones.arguments.CapturesArguments`, stored in checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from backbones.arguments import CapturesArguments
from backbones.features import FeaturePyramid
from tasks.layers import check_dropout, resize

#: PSPNet's pyramid bins (Zhao et al., CVPR 2017; BAM ``model/PSPNet.py``: ``bins=(1, 2, 3, 6)``).
PSP_BINS = (1, 2, 3, 6)


class PPM(nn.Module):
    """Pyramid pooling (BAM ``model/PPM.py``): per bin, adaptive average pooling, 1x1 conv
    without bias to ``reduction_dim``, BatchNorm, ReLU, resized back bilinearly with
    ``align_corners=True``; the input and the bins concatenated in that order."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int]) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(size),
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            )
            for size in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(resize(branch(x), size) for branch in self.features)], 1)


#: The decoder's keys in BAM's base learner files (``model/PSPNet.py``: ``ppm.*``, ``cls.*``),
#: which :class:`PSPDecoder` keeps.
DECODER_PREFIXES = ("ppm.", "cls.")


class PSPDecoder(CapturesArguments, nn.Module):
    """PSPNet's decoder: :class:`PPM` then the classifier (3x3 conv to ``channels`` without bias,
    BatchNorm, ReLU, Dropout2d, 1x1 conv to the classes), as BAM ``model/PSPNet.py``'s
    ``self.ppm`` and ``self.cls`` (keys ``ppm.features.<i>.1.weight``, ``cls.0.weight``,
    ``cls.4.bias``...).

    Args:
        features: the encoder's outputs (``backbone.output_info``; the task passes them).
        num_classes: output classes (BAM: 16 for PASCAL-5i, 61 for COCO-20i, background
            included).
        in_feature: the backbone output it decodes; ``None``: the deepest stage's (PSPNet:
            ``layer4``).
        bins: pyramid bins (PSPNet: 1, 2, 3, 6).
        reduction_dim: channels of each bin; ``None``: ``in / len(bins)`` as BAM
            (``int(fea_dim / len(bins))``: 512 for a ResNet-50's 2048).
        channels: the classifier's hidden channels (512).
        dropout: Dropout2d probability before the last conv (0.1).
    """

    uncaptured_arguments: ClassVar[tuple[str, ...]] = ("features", "num_classes")

    def __init__(
        self,
        features: FeaturePyramid,
        num_classes: int,
        in_feature: str | None = None,
        bins: Sequence[int] = PSP_BINS,
        reduction_dim: int | None = None,
        channels: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_dropout(self, dropout=dropout)
        in_feature = features.stage(-1).name if in_feature is None else in_feature
        if in_feature not in features:
            raise ValueError(
                f"PSPDecoder in_feature={in_feature!r} is not a backbone output; expected one "
                f"of {list(features)}"
            )
        if num_classes < 2 or not bins or min(bins) < 1:
            raise ValueError(
                f"PSPDecoder: num_classes={num_classes} (expected >= 2), bins={list(bins)} "
                "(expected positive sizes)"
            )
        fea_dim = features[in_feature].channels
        reduction = int(fea_dim / len(bins)) if reduction_dim is None else reduction_dim
        self.in_features = [in_feature]
        self.num_classes = num_classes
        self.ppm = PPM(fea_dim, reduction, bins)
        self.cls = nn.Sequential(
            nn.Conv2d(fea_dim + len(bins) * reduction, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(channels, num_classes, kernel_size=1),
        )

    def decode(self, feature: Tensor) -> Tensor:
        """Logits ``[B, num_classes, h, w]`` of one feature map (a head's query layer4)."""
        return self.cls(self.ppm(feature))

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Logits at the resolution of ``feats[in_feature]``."""
        return self.decode(feats[self.in_features[0]])
