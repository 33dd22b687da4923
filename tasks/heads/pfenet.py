"""PFENet head: Tian et al., "Prior Guided Feature Enrichment Network for Few-Shot
Segmentation", TPAMI 2020; official code github.com/dvlab-research/PFENet (``model/PFENet.py``,
``config/pascal/pascal_split0_resnet50.yaml``, ``config/coco/coco_split0_resnet101.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from backbones.features import FeaturePyramid
from tasks.layers import check_dropout, resize

from .common import (
    COSINE_EPS,
    HeadOutput,
    check_inputs,
    foreground_masks,
    masked_average_pooling,
    mid_level_channels,
    mid_level_features,
    mid_level_layers,
)
from .fem import FeatureEnrichment


def shot_priors(
    query: Tensor, support: Tensor, support_masks: Tensor, size: Sequence[int]
) -> Tensor:
    """PFENet's training-free prior (official ``corr_query_mask``) of each shot, in fp32 with
    autocast off.

    Every query pixel's cosine similarity to every masked support pixel, ``s.q / (|s| |q| +
    1e-7)``, maximum over the support pixels; min-max normalised over the query's pixels
    (``(x - min) / (max - min + 1e-7)``), resized to ``size`` (bilinear, align_corners).

    Args:
        query: [B, C, h, w] query high-level features.
        support: [B, K, C, h, w] support high-level features; they are multiplied here by the
            foreground mask resized to their size (the official ``tmp_supp_feat * tmp_mask``).
        support_masks: [B, K, H, W] labels (1 foreground).
        size: the prior's size (layer3's).

    Returns:
        [B, K, *size] float32.
    """
    b, k, _, h, w = support.shape
    with torch.autocast(query.device.type, enabled=False):
        mask = foreground_masks(support_masks, (h, w)).view(b, k, 1, h * w)
        support = support.float().flatten(3) * mask  # [B, K, C, Ps]
        query = query.float().flatten(2)  # [B, C, Pq]
        dots = torch.einsum("bkcs,bcq->bksq", support, query)
        norms = support.norm(dim=2)[..., None] * query.norm(dim=1)[:, None, None]
        similarity = (dots / (norms + COSINE_EPS)).amax(2)  # [B, K, Pq]
        low = similarity.amin(2, keepdim=True)
        high = similarity.amax(2, keepdim=True)
        similarity = (similarity - low) / (high - low + COSINE_EPS)
        return resize(similarity.view(b * k, 1, h, w), size).view(b, k, *size)


def prior_mask(
    query: Tensor, support: Tensor, support_masks: Tensor, size: Sequence[int]
) -> Tensor:
    """PFENet's prior: :func:`shot_priors` averaged over the shots, [B, 1, *size] float32."""
    return shot_priors(query, support, support_masks, size).mean(1, keepdim=True)


def mid_level_reduction(in_channels: int, reduce_dim: int, dropout: float) -> nn.Sequential:
    """1x1 conv without bias, ReLU, Dropout2d (PFENet's and BAM's ``down_query``,
    ``down_supp``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, reduce_dim, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


class PFENetHead(FeatureEnrichment):
    """PFENet's prior generation and Feature Enrichment Module (ResNet variant).

    From the official ``model/PFENet.py`` (names and shapes kept, so its checkpoints load):

    * Mid-level features: layer3 and layer2 concatenated (layer3 first), reduced by
      ``down_query`` and ``down_supp`` (1x1 conv, ReLU, Dropout2d 0.5; two modules).
    * Prototype: masked average pooling (``Weighted_GAP``, area eps 5e-4) of the reduced
      support with the label-1 mask resized bilinearly (align_corners) to layer3's size;
      averaged over the shots.
    * Prior (:func:`prior_mask`): from layer4. The support's layer4 is computed on its layer3
      multiplied by that same mask (``self.layer4(supp_feat_3*mask)``), which the head asks of
      the task by declaring ``support_mask_at = "layer3"``; the query's layer4 is plain. Both
      are computed without gradient, as in the official code, and so is the prior.
    * Decoder: the :class:`~tasks.heads.fem.FeatureEnrichment` shared with ASGNet, on the
      guide ``[query, prototype]`` (the prototype tiled over the query) and the prior.
      Auxiliary loss weight 1.0, averaged over bins (``aux_weight`` in the configs).

    Official checkpoint key map (``train_epoch_*.pth``, after stripping ``module.``; ``i``
    indexes the bins): ``init_merge.{i}.0.weight`` -> ``corr_conv.{i}.0.weight``;
    ``down_query.0.weight``, ``down_supp.0.weight``, ``alpha_conv.{i-1}.0.weight``,
    ``beta_conv.{i}.{0,2}.weight``, ``inner_cls.{i}.{0,3}.*``, ``res1.0.weight``,
    ``res2.{0,2}.weight``, ``cls.{0,3}.*`` keep their names. ``layer0.*`` .. ``layer4.*``
    belong to the backbone. The VGG variant is not implemented.

    Deviations: batched over episodes and shots (no Python loops; the similarity of all shots
    is one einsum, the prior's mask is resized to layer4's height and width where the official
    code assumes square features); the prototype is pooled from the tiled guide by the FEM
    rather than expanded to each bin (equal up to float rounding); absolute bins are clamped
    per side to the feature size (:func:`~tasks.heads.fem.pyramid_bin_size`); the official
    final resize of the prior to the reduced query's size is dropped (it is the same size);
    logits are returned at feature size and upsampled by the task, as every head here.

    Args:
        features: The encoder's outputs; the head reads the mid-level ones
            (:func:`~tasks.heads.common.mid_level_layers`) and the deepest stage's.
        reduce_dim: Channels of the reduced features (official 256).
        bins: Pyramid bins, absolute (> 1) or fractions (<= 1): official PASCAL 60/30/15/8,
            COCO 1.0/0.5/0.25/0.125.
        aux_weight: Weight of the mean auxiliary loss, official 1.0.
        dropout: Dropout2d probability of ``down_query``/``down_supp``, official 0.5.
    """

    official_paper = "PFENet"
    official_signature = "init_merge.0.0.weight"  # BAM has a down_query too
    official_renames = (("init_merge.", "corr_conv."),)

    def __init__(
        self,
        features: FeaturePyramid,
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        aux_weight: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        check_dropout(self, dropout=dropout)
        super().__init__(reduce_dim, bins)
        self.mid_level = mid_level_layers(features)
        # the prior reads the deepest stage, computed for the support on its masked input
        self.prior_layer = features.stage(-1).name
        self.support_mask_at = features.stage(-2).name
        self.in_features = (*self.mid_level, self.prior_layer)
        self.aux_weight = aux_weight
        channels = mid_level_channels(features)
        self.down_query = mid_level_reduction(channels, reduce_dim, dropout)
        self.down_supp = mid_level_reduction(channels, reduce_dim, dropout)

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query; see :mod:`tasks.heads` for shapes. The support's deepest
        stage must come from its masked ``support_mask_at`` output (the task computes it so)."""
        check_inputs(query_feats, support_feats, support_masks, self.in_features)
        batch, shots = support_masks.shape[:2]
        query = self.down_query(mid_level_features(query_feats, self.mid_level))
        support = self.down_supp(mid_level_features(support_feats, self.mid_level))
        size = query.shape[-2:]
        masks = foreground_masks(support_masks, size)
        prototype = masked_average_pooling(support, masks).view(batch, shots, -1).mean(1)
        prototype = prototype.to(query.dtype)[:, :, None, None].expand_as(query)
        with torch.no_grad():
            prior = prior_mask(
                query_feats[self.prior_layer], support_feats[self.prior_layer], support_masks, size
            )
        logits, aux_logits = self.decode(torch.cat([query, prototype], 1), prior.to(query.dtype))
        return HeadOutput(logits=logits, aux_logits=aux_logits, aux_weight=self.aux_weight)
