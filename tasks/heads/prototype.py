"""Prototype baseline: masked average pooling, cosine similarity, a light decoder."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from backbones.features import FeaturePyramid
from tasks.layers import check_dropout

from .base import FewShotHead
from .common import (
    HeadOutput,
    check_inputs,
    cosine_similarity_map,
    foreground_masks,
    masked_average_pooling,
    mid_level_channels,
    mid_level_features,
    mid_level_layers,
)


class PrototypeHead(FewShotHead):
    """One foreground prototype per episode compared with every query pixel.

    The mid-level feature is PFENet's (Tian et al., TPAMI 2020): the two stages before the
    deepest (a ResNet's layer3 and layer2, :func:`~tasks.heads.common.mid_level_layers`)
    concatenated, reduced by a 1x1 convolution without bias, ReLU and Dropout2d, shared by query
    and support. The support's foreground prototype is the masked average of its features
    (PANet/PFENet), averaged over the K shots. The decoder sees the query feature, the tiled
    prototype and the cosine similarity map and predicts two classes.

    Args:
        features: The encoder's outputs (:attr:`backbones.Backbone.output_info`).
        reduce_dim: Channels of the reduced mid-level feature and of the decoder.
        dropout: Dropout2d probability after the reduction (PFENet: 0.5).
        decoder_dropout: Dropout2d probability before the decoder's classifier.
    """

    def __init__(
        self,
        features: FeaturePyramid,
        reduce_dim: int = 256,
        dropout: float = 0.5,
        decoder_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_dropout(self, dropout=dropout, decoder_dropout=decoder_dropout)
        self.in_features = self.mid_level = mid_level_layers(features)
        self.reduce = nn.Sequential(
            nn.Conv2d(mid_level_channels(features), reduce_dim, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * reduce_dim + 1, reduce_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(decoder_dropout),
            nn.Conv2d(reduce_dim, 2, 1),
        )

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query; see :mod:`tasks.heads` for shapes."""
        check_inputs(query_feats, support_feats, support_masks, self.mid_level)
        batch, shots = support_masks.shape[:2]
        query = self.reduce(mid_level_features(query_feats, self.mid_level))
        support = self.reduce(mid_level_features(support_feats, self.mid_level))
        masks = foreground_masks(support_masks, support.shape[-2:])
        prototype = masked_average_pooling(support, masks).view(batch, shots, -1).mean(1)
        similarity = cosine_similarity_map(query, prototype[:, None])  # [B, 1, h, w]
        prototype = prototype.to(query.dtype)[..., None, None].expand_as(query)
        merged = torch.cat([query, prototype, similarity.to(query.dtype)], 1)
        return HeadOutput(logits=self.decoder(merged), aux_logits=[], aux_weight=0.0)
