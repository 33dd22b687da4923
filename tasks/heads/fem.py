"""PFENet's Feature Enrichment Module, the decoder PFENet and ASGNet share.

Tian et al., "Prior Guided Feature Enrichment Network for Few-Shot Segmentation", TPAMI 2020
(official ``model/PFENet.py``, github.com/dvlab-research/PFENet); ASGNet (``model/asgnet.py``)
reuses it with its own guide feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.layers import resize

from .official import OfficialCheckpoint


def pyramid_bin_size(bin: float, size: tuple[int, int]) -> tuple[int, int]:
    """Pooled size of one pyramid level for a feature map of ``size``.

    As the official code: a bin <= 1 is a fraction of the feature size (``int(size * bin)``,
    at least 1); a bin > 1 is an absolute size. The official bins 60/30/15/8 assume 60x60
    features (473 crops at stride 8); absolute bins are clamped to the feature size so that
    small inputs do not upsample, and bins apply per side (the official code makes square bins;
    equal for its square crops). For small inputs, fractions such as (1.0, 0.5, 0.25, 0.125)
    keep the official ratios.
    """
    if bin <= 1:
        return max(1, int(size[0] * bin)), max(1, int(size[1] * bin))
    return min(int(bin), size[0]), min(int(bin), size[1])


def conv1x1_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv without bias and ReLU (official ``init_merge``/``corr_conv``, ``alpha_conv``,
    ``res1``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.ReLU(inplace=True))


def double_conv(channels: int) -> nn.Sequential:
    """Two 3x3 convs without bias, each with ReLU (official ``beta_conv``, ``res2``)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
    )


def classifier(channels: int) -> nn.Sequential:
    """3x3 conv, ReLU, Dropout2d(0.1), 1x1 conv to 2 classes (official ``cls``, ``inner_cls``)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(channels, 2, 1),
    )


class FeatureEnrichment(OfficialCheckpoint):
    """Base class of the heads decoding with the Feature Enrichment Module.

    For each bin: adaptive average pooling of the guide feature (query and prototype, 2C
    channels) with the prior resized to the bin (bilinear, align_corners), ``corr_conv``
    (2C+1 -> C), ``alpha_conv`` merging the previous bin resized to this one (from the second bin
    on, residual), ``beta_conv`` with residual and the auxiliary classifier ``inner_cls``; then
    ``res1`` over the bins resized to the feature size and concatenated in bin order, ``res2``
    with residual and ``cls``. A base class rather than a submodule so that the heads' state-dict
    keys stay those of the official checkpoints (``corr_conv.0.0.weight``, ``cls.3.bias``...);
    PFENet's ``init_merge`` is ASGNet's ``corr_conv``. Both papers' checkpoints hold the PSPNet
    encoder (:class:`~tasks.heads.official.OfficialCheckpoint`).

    Args:
        reduce_dim: C, the channels of the reduced features (official 256).
        bins: Pyramid bins, absolute sizes (> 1) or fractions of the feature size (<= 1)
            (:func:`pyramid_bin_size`).
    """

    official_encoder: ClassVar[Mapping[str, Any]] = {
        "stem": "deep",
        "output_stride": 8,
        "dilation_scheme": "uniform",
    }

    def __init__(self, reduce_dim: int, bins: Sequence[float]) -> None:
        super().__init__()
        if not bins or any(b <= 0 for b in bins):
            raise ValueError(f"bins must be a non-empty list of positive sizes, got {list(bins)}")
        self.bins = tuple(bins)
        self.corr_conv = nn.ModuleList(conv1x1_relu(2 * reduce_dim + 1, reduce_dim) for _ in bins)
        self.alpha_conv = nn.ModuleList(conv1x1_relu(2 * reduce_dim, reduce_dim) for _ in bins[1:])
        self.beta_conv = nn.ModuleList(double_conv(reduce_dim) for _ in bins)
        self.inner_cls = nn.ModuleList(classifier(reduce_dim) for _ in bins)
        self.res1 = conv1x1_relu(len(bins) * reduce_dim, reduce_dim)
        self.res2 = double_conv(reduce_dim)
        self.cls = classifier(reduce_dim)

    def decode(self, guide: Tensor, prior: Tensor) -> tuple[Tensor, list[Tensor]]:
        """[B, 2C, h, w] guide and [B, 1, h, w] prior -> (logits [B, 2, h, w], per-bin
        auxiliary logits)."""
        size = guide.shape[-2:]
        levels: list[Tensor] = []
        aux_logits: list[Tensor] = []
        for i, bin in enumerate(self.bins):
            bin_size = pyramid_bin_size(bin, size)
            pooled = F.adaptive_avg_pool2d(guide, bin_size)
            merged = self.corr_conv[i](torch.cat([pooled, resize(prior, bin_size)], 1))
            if i > 0:
                previous = resize(levels[-1], bin_size)
                merged = self.alpha_conv[i - 1](torch.cat([merged, previous], 1)) + merged
            merged = self.beta_conv[i](merged) + merged
            aux_logits.append(self.inner_cls[i](merged))
            levels.append(resize(merged, size))
        feat = self.res1(torch.cat(levels, 1))
        feat = self.res2(feat) + feat
        return self.cls(feat), aux_logits
