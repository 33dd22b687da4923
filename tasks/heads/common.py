"""Pieces shared by the few-shot heads: output type, input checks, mid-level features, pooling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.features import FeaturePyramid
from tasks.layers import resize

#: Eps added to the mask area in masked average pooling (``Weighted_GAP`` in PFENet/ASGNet).
MAP_EPS = 5e-4

#: Eps of the cosine similarity (``F.cosine_similarity(..., eps=1e-7)`` in ASGNet).
COSINE_EPS = 1e-7


class HeadOutput(NamedTuple):
    """What a head returns.

    ``logits`` [B, 2, h, w] at feature resolution (the task upsamples); ``aux_logits``
    [B, 2, *, *] each, possibly empty; the task's loss is
    ``ce(logits) + aux_weight * mean(ce(a) for a in aux_logits)`` (ASGNet/PFENet average the
    auxiliary losses over the pyramid bins). ``shot_logits`` [B, K, 2, h, w], set by a head that
    segments with each shot alone (HSNet): evaluation then predicts each shot's mask at the
    scored resolution and combines them with :func:`vote`.
    """

    logits: Tensor
    aux_logits: list[Tensor]
    aux_weight: float
    shot_logits: Tensor | None = None


def vote(predictions: Tensor) -> Tensor:
    """HSNet's K-shot vote (``predict_mask_nshot`` of juhongm999/hsnet): [..., K, h, w] binary
    per-shot predictions -> [..., h, w] long. A pixel is foreground when its votes reach half
    the most votes any pixel of that query got (at least one vote)."""
    votes = predictions.sum(-3)
    most = votes.flatten(-2).amax(-1).clamp(min=1)[..., None, None]
    return (votes.float() / most >= 0.5).long()


def mid_level_layers(features: FeaturePyramid) -> tuple[str, str]:
    """PFENet's mid-level features: the outputs of the two stages before the deepest, the
    deeper first (a ResNet's layer3 and layer2; PFENet's and BAM's VGG-16 cut the same way).
    PFENet and ASGNet (``model/asgnet.py``: ``torch.cat([query_feat_3, query_feat_2], 1)``)
    concatenate them in this order, which loading their weights needs."""
    return features.stage(-2).name, features.stage(-3).name


def mid_level_channels(features: FeaturePyramid) -> int:
    """Channels of :func:`mid_level_features` for an encoder with ``features``."""
    return sum(features[name].channels for name in mid_level_layers(features))


def mid_level_features(feats: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate the outputs ``names`` (:func:`mid_level_layers`) at the first one's size:
    [N, C3 + C2, h, w].

    Support features [B, K, C, h, w] are flattened to [B*K, C, h, w]. At output stride 16 (and
    on VGG-16) layer2 is twice layer3's size; it is resized bilinearly (align_corners, as
    PFENet's ``if self.vgg`` branch and ASGNet). At output stride 8 both have the same size.
    """
    deeper, shallower = (feats[name] for name in names)
    if deeper.ndim == 5:
        deeper, shallower = deeper.flatten(0, 1), shallower.flatten(0, 1)
    if shallower.shape[-2:] != deeper.shape[-2:]:
        shallower = resize(shallower, deeper.shape[-2:])
    return torch.cat([deeper, shallower], 1)


def check_inputs(
    query_feats: Mapping[str, Tensor],
    support_feats: Mapping[str, Tensor],
    support_masks: Tensor,
    names: Sequence[str],
) -> None:
    """Raise ``ValueError`` naming the argument when the head's inputs (the outputs ``names``)
    are missing or inconsistent."""
    for name in names:
        if name not in query_feats:
            raise ValueError(f"query_feats lacks {name!r}; got {sorted(query_feats)}")
        if name not in support_feats:
            raise ValueError(f"support_feats lacks {name!r}; got {sorted(support_feats)}")
        query, support = query_feats[name], support_feats[name]
        if query.ndim != 4:
            raise ValueError(f"query_feats[{name!r}] must be [B, C, h, w], got {query.shape}")
        if support.ndim != 5:
            raise ValueError(
                f"support_feats[{name!r}] must be [B, K, C, h, w], got {support.shape}"
            )
        if support.shape[0] != query.shape[0] or support.shape[2] != query.shape[1]:
            raise ValueError(
                f"support_feats[{name!r}] {tuple(support.shape)} does not match "
                f"query_feats[{name!r}] {tuple(query.shape)} in batch size or channels"
            )
    batch_shots = support_feats[names[0]].shape[:2]
    if support_masks.ndim != 4 or support_masks.shape[:2] != batch_shots:
        raise ValueError(
            f"support_masks must be [B, K, H, W] with B, K = {tuple(batch_shots)}, "
            f"got {tuple(support_masks.shape)}"
        )


def foreground_masks(support_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, K, H, W] labels -> [B*K, 1, h, w] soft foreground masks at feature size.

    Only label 1 counts as foreground (255 does not), and the mask is resized bilinearly with
    ``align_corners=True`` (PFENet/ASGNet ``mask = (s_y == 1)`` followed by ``F.interpolate``).
    """
    fg = (support_masks == 1).flatten(0, 1).unsqueeze(1).float()
    return resize(fg, size)


def masked_average_pooling(feats: Tensor, mask: Tensor) -> Tensor:
    """[N, C, h, w] features, [N, 1, h, w] mask -> [N, C] prototypes (``Weighted_GAP``)."""
    feats, mask = feats.float(), mask.float()
    return (feats * mask).sum((2, 3)) / (mask.sum((2, 3)) + MAP_EPS)


def cosine_similarity_map(query: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of each query pixel with each prototype, in fp32.

    Args:
        query: [B, C, h, w].
        prototypes: [B, M, C].

    Returns:
        [B, M, h, w] float32, computed with autocast off so that bf16 does not reorder
        nearly tied similarities.
    """
    with torch.autocast(query.device.type, enabled=False):
        query = F.normalize(query.float(), dim=1, eps=COSINE_EPS)
        prototypes = F.normalize(prototypes.float(), dim=2, eps=COSINE_EPS)
        return torch.einsum("bmc,bchw->bmhw", prototypes, query)
