"""HSNet head: Min, Lee and Cho, "Hypercorrelation Squeeze for Few-Shot Segmentation", ICCV 2021;
official code github.com/juhongm999/hsnet (``model/hsnet.py``, ``model/learner.py``,
``model/base/conv4d.py``, ``model/base/correlation.py``, ``model/base/feature.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.features import FeaturePyramid
from tasks.layers import resize

from .common import HeadOutput, check_inputs, foreground_masks
from .official import OfficialCheckpoint

#: The learner's levels (the official module names, coarsest first) and the encoder stage whose
#: blocks each correlates, counted from the deepest (a ResNet's layer4, layer3, layer2).
CORRELATED_STAGES = {"layer4": -1, "layer3": -2, "layer2": -3}

#: Eps added to the feature norms before the cosine correlation (``correlation.py``).
NORM_EPS = 1e-5

#: Output channels of the three 4D convolutions of every squeezing block (``learner.py``).
SQUEEZE_CHANNELS = (16, 64, 128)

#: Kernel sizes and support strides of each stage's squeezing block (``learner.py``).
SQUEEZE_LAYOUT = {
    "layer4": ((3, 3, 3), (2, 2, 2)),
    "layer3": ((5, 3, 3), (4, 2, 2)),
    "layer2": ((5, 5, 3), (4, 4, 2)),
}

#: Groups of the GroupNorm after each 4D convolution (``make_building_block``'s ``group=4``).
NORM_GROUPS = 4


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution of a correlation [B, C, ha, wa, hb, wb] (query dims ``a``,
    support dims ``b``): a 2D convolution over the query dims at each support position
    (``conv1``) plus one over the support dims at each query position (``conv2``), the two
    slices of a 4D kernel through its center. ``conv2`` strides the support dims; ``conv1``
    runs on every ``support_stride``-th support position, so both land on one grid
    (the official ``prune``). The query dims keep their size.

    Under CPU autocast both convolutions run in fp32: oneDNN's bf16 convolution backward (torch
    2.14) now and then returns NaN gradients for strided convolutions with a 1x1 output, which
    the squeezing blocks make of small support grids (kernel 5, stride 4 on 2x2).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=support_stride, padding=padding
        )
        self.support_stride = support_stride

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.convolve(x.float())
        return self.convolve(x)

    def convolve(self, x: Tensor) -> Tensor:
        b, c, ha, wa, hb, wb = x.shape
        pruned = x[..., :: self.support_stride, :: self.support_stride]
        hs, ws = pruned.shape[-2:]
        query = self.conv1(pruned.permute(0, 4, 5, 1, 2, 3).reshape(b * hs * ws, c, ha, wa))
        query = query.view(b, hs, ws, -1, ha, wa).permute(0, 3, 4, 5, 1, 2)
        support = self.conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(b * ha * wa, c, hb, wb))
        support = support.view(b, ha, wa, -1, hs, ws).permute(0, 3, 1, 2, 4, 5)
        return query + support


def squeezing_block(
    in_channels: int,
    out_channels: Sequence[int],
    kernel_sizes: Sequence[int],
    support_strides: Sequence[int],
) -> nn.Sequential:
    """4D conv, GroupNorm(4), ReLU per layer (official ``make_building_block``; its indices
    0, 1, 2, 3... are the checkpoint's)."""
    layers: list[nn.Module] = []
    for channels, kernel, stride in zip(out_channels, kernel_sizes, support_strides, strict=True):
        layers += [
            CenterPivotConv4d(in_channels, channels, kernel, stride),
            nn.GroupNorm(NORM_GROUPS, channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = channels
    return nn.Sequential(*layers)


def correlation(query: Tensor, support: Tensor, support_masks: Tensor | None) -> Tensor:
    """One layer's correlation in fp32 (official ``Correlation.multilayer_correlation``): the
    support features multiplied by the foreground mask (label 1, bilinear with align_corners),
    both sides divided by their channel norm + 1e-5, dot products clamped at 0.

    Args:
        query: [B, C, ha, wa].
        support: [B, K, C, hb, wb].
        support_masks: [B, K, H, W] labels; ``None``: the support is not masked.

    Returns:
        [B*K, ha, wa, hb, wb] float32, each shot's correlation with the query.
    """
    b, k, _, hb, wb = support.shape
    ha, wa = query.shape[-2:]
    with torch.autocast(query.device.type, enabled=False):
        support = support.float().flatten(0, 1)
        if support_masks is not None:
            support = support * foreground_masks(support_masks, (hb, wb))
        support = support.flatten(2)
        support = support / (support.norm(dim=1, keepdim=True) + NORM_EPS)
        query = query.float().flatten(2)
        query = query / (query.norm(dim=1, keepdim=True) + NORM_EPS)
        corr = torch.einsum("bcq,bkcs->bkqs", query, support.view(b, k, *support.shape[1:]))
        return corr.clamp(min=0).reshape(b * k, ha, wa, hb, wb)


def resize_4d(x: Tensor, like: Tensor) -> Tensor:
    """Resize a [B, C, ha, wa, hb, wb] tensor's query dims to those of ``like`` (bilinear,
    align_corners: the official ``interpolate_support_dims``, which despite its name resizes the
    query dims) and, where the official code would fail on a sum of unequal shapes, its support
    dims too (bilinear with antialiasing: averaging when shrinking; in fp32, which CPU
    antialiasing needs)."""
    b, c, ha, wa, hb, wb = x.shape
    query_size, support_size = like.shape[-4:-2], like.shape[-2:]
    if (ha, wa) != query_size:
        x = resize(x.permute(0, 4, 5, 1, 2, 3).reshape(b * hb * wb, c, ha, wa), query_size)
        x = x.view(b, hb, wb, c, *query_size).permute(0, 3, 4, 5, 1, 2)
        ha, wa = query_size
    if (hb, wb) != support_size:
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(b * ha * wa, c, hb, wb)
        x = F.interpolate(x.float(), support_size, mode="bilinear", antialias=True).to(x.dtype)
        x = x.view(b, ha, wa, c, *support_size).permute(0, 3, 1, 2, 4, 5)
    return x


class HSNetHead(OfficialCheckpoint):
    """HSNet's hypercorrelation squeeze network (ResNet variant).

    From the official code (names and shapes kept, so its ``best_model.pt`` loads):

    * Features: every block of layer2..layer4 before its last ReLU (``extract_feat_res``
      appends ``feat`` after the residual sum; ResNet-50: 4 + 6 + 3 = 13 blocks), which the head
      selects as the pre-activation block taps of the encoder's last three stages
      (``layerS.i.pre_relu`` of a ResNet). HSNet's backbone is torchvision's
      ResNet (output stride 32) in ``eval()`` under ``torch.no_grad``; see
      ``configs/segment/hsnet_pascal.yaml``.
    * Correlation (:func:`correlation`): per block, the masked support against the query,
      stacked per stage in block order: [B, n_stage, ha, wa, hb, wb].
    * Squeezing (``encoder_layer4/3/2``): three :class:`CenterPivotConv4d` + GroupNorm(4) +
      ReLU each, 16/64/128 channels, kernels 3-3-3 / 5-3-3 / 5-5-3 and support strides
      2-2-2 / 4-2-2 / 4-4-2; mixing top-down (layer4 resized to layer3's query size and added,
      ``encoder_layer4to3``; then to layer2's, ``encoder_layer3to2``), mean over the support
      dims, ``decoder1`` (two 3x3 convs with bias and ReLU, 128 -> 128 -> 64), 2x bilinear
      upsampling (align_corners), ``decoder2`` (64 -> 64 -> 2).
    * K shots: the official code runs the model once per shot and, for K > 1, votes
      (:func:`~tasks.heads.common.vote` on each shot's argmax at the scored resolution). The
      head segments every shot alone in one batched call and returns the shots' logits as
      ``shot_logits`` (the task votes); ``logits`` is their mean (the loss for K > 1 training,
      which HSNet does not do).

    Official checkpoint key map (``best_model.pt``, a ``DataParallel`` state dict):
    ``module.hpn_learner.<name>`` -> ``<name>`` (``encoder_layer4.0.conv1.weight``,
    ``encoder_layer4.1.weight`` (GroupNorm), ``decoder2.2.bias``...);
    ``module.backbone.*`` is the torchvision ResNet (``fc.*`` unused).

    Deviations: shots batched (no loop); the correlation is differentiable (the official one
    runs under ``no_grad``; equal for the frozen backbone HSNet trains with, and it lets a
    fine-tuned backbone learn); the 2x upsampling doubles height and width (official: a square
    of twice the width, equal for square inputs); where two stages' squeezed support grids
    differ (inputs other than 400 px at output stride 32, e.g. a dilated encoder), the coarser
    one's support dims are resized (:func:`resize_4d`) instead of the official crash; the
    official ``padding == 0`` branch of ``CenterPivotConv4d`` is unreachable with its padding
    ``k // 2`` and is left out; the loss is the task's cross-entropy (HSNet's ``compute_objective``
    is a 2-class cross-entropy too; the ``hsnet`` preset's ``train_ignore: background`` gives its
    targets, where the query's 255 pixels count as background); logits are returned at 1/4 of the
    input (the task upsamples, bilinear with align_corners, as the official forward). HSNet's VGG
    variant is not reproduced: it correlates conv4_1..conv5_3 and pool5 in groups of 2/2/3 that
    cross its stages; on :class:`backbones.VGG` this head correlates the convs of its last three
    stages, a variant of its own.

    Args:
        features: The encoder's outputs; the pre-activation taps of every block of its last
            three stages are read, at least one per stage (an encoder without such taps: its
            block outputs).
        mask_support: multiply the support features by the mask before correlating. ``False``
            is the paper's Tab. 1 setting (the README's "evaluation without support feature
            masking", line 51 of ``hsnet.py`` commented out): the support mask is then unused.
    """

    official_paper = "HSNet"
    official_signature = "hpn_learner.encoder_layer4.0.conv1.weight"
    official_renames = (("hpn_learner.", ""),)
    official_encoder: ClassVar[Mapping[str, Any]] = {"stem": "standard", "output_stride": 32}

    def __init__(self, features: FeaturePyramid, mask_support: bool = True) -> None:
        super().__init__()
        self.mask_support = mask_support
        # Block outputs before their last activation; an encoder that has no such taps at all
        # (ConvNeXt, Swin, ViTs) gives its block outputs, as DCAMA correlates Swin's and
        # FoundationFSS DINOv2's.
        taps = any(info.pre_activation for info in features.values())
        self.stage_blocks = {
            level: [info.name for info in features.blocks(stage, pre_activation=taps)]
            for level, stage in CORRELATED_STAGES.items()
        }
        empty = [
            features.stage(CORRELATED_STAGES[lv]).name
            for lv, b in self.stage_blocks.items()
            if not b
        ]
        if empty:
            raise ValueError(
                f"the encoder declares no block outputs in its stages {empty}; HSNet correlates "
                "every block of the last three stages (before its last activation where the "
                "encoder has such taps)"
            )
        self.in_features = tuple(
            name for level in reversed(CORRELATED_STAGES) for name in self.stage_blocks[level]
        )
        _, out2, out3 = SQUEEZE_CHANNELS
        for stage, (kernels, strides) in SQUEEZE_LAYOUT.items():
            blocks = len(self.stage_blocks[stage])
            self.add_module(
                f"encoder_{stage}", squeezing_block(blocks, SQUEEZE_CHANNELS, kernels, strides)
            )
        self.encoder_layer4to3 = squeezing_block(out3, (out3,) * 3, (3, 3, 3), (1, 1, 1))
        self.encoder_layer3to2 = squeezing_block(out3, (out3,) * 3, (3, 3, 3), (1, 1, 1))
        self.decoder1 = nn.Sequential(
            nn.Conv2d(out3, out3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out3, out2, 3, padding=1),
            nn.ReLU(),
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(out2, out2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out2, 2, 3, padding=1),
        )

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query with each shot; see :mod:`tasks.heads` for shapes."""
        check_inputs(query_feats, support_feats, support_masks, self.in_features)
        batch, shots = support_masks.shape[:2]
        masks = support_masks if self.mask_support else None
        squeezed = {}
        for stage, names in self.stage_blocks.items():
            corr = torch.stack(
                [correlation(query_feats[n], support_feats[n], masks) for n in names], 1
            )
            encoder = getattr(self, f"encoder_{stage}")
            squeezed[stage] = encoder(corr.to(self.decoder1[0].weight.dtype))
        mixed = self.encoder_layer4to3(
            resize_4d(squeezed["layer4"], squeezed["layer3"]) + squeezed["layer3"]
        )
        mixed = self.encoder_layer3to2(resize_4d(mixed, squeezed["layer2"]) + squeezed["layer2"])
        encoded = mixed.flatten(-2).mean(-1)
        decoded = self.decoder1(encoded)
        decoded = resize(decoded, [2 * side for side in decoded.shape[-2:]])
        logits = self.decoder2(decoded).unflatten(0, (batch, shots))
        return HeadOutput(
            logits=logits.mean(1),
            aux_logits=[],
            aux_weight=0.0,
            shot_logits=logits if shots > 1 else None,
        )
