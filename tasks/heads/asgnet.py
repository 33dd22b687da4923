"""ASGNet head: Li et al., "Adaptive Prototype Learning and Allocation for Few-Shot
Segmentation", CVPR 2021; official code github.com/Reagan1311/ASGNet (``model/asgnet.py``,
``util/seed_init.py``, ``data/config/pascal/*.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.features import FeaturePyramid
from tasks.layers import check_dropout

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
from .fem import FeatureEnrichment

#: The clustering distance is ``sqrt(feature_d2 + spatial_d2 / 100)`` (``sp_center_iter``).
SPATIAL_SCALE = 100.0

#: A feature pixel belongs to the clustering region when its bilinearly resized mask is 1
#: (official ``supp_mask == 1``); the tolerance absorbs float rounding of the interpolation.
ROI_TOLERANCE = 1e-4


def _squared_distance_to(points: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, 2] (y, x) points -> [N, h, w] squared distance of every pixel to its point."""
    ys = torch.arange(size[0], device=points.device, dtype=torch.float32)
    xs = torch.arange(size[1], device=points.device, dtype=torch.float32)
    points = points.float()
    dy2 = (ys[None] - points[:, :1]).square()
    dx2 = (xs[None] - points[:, 1:]).square()
    return dy2[:, :, None] + dx2[:, None, :]


def _squared_edt(zeros: Tensor) -> Tensor:
    """Exact squared Euclidean distance to the nearest ``True`` of [N, h, w] (inf if none).

    Separable (column pass, then row pass) and vectorised over N; memory O(N h w (h + w)),
    small at 1/8 resolution.
    """
    _, h, w = zeros.shape
    ys = torch.arange(h, device=zeros.device, dtype=torch.float32)
    xs = torch.arange(w, device=zeros.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=zeros.device)
    dy2 = (ys[:, None] - ys[None]).square()  # [h, h']
    column = torch.where(zeros[:, None], dy2[None, :, :, None], inf).amin(2)  # [N, h, w]
    dx2 = (xs[:, None] - xs[None]).square()  # [w, w']
    return (column[:, :, None, :] + dx2).amin(3)


def place_seeds(
    mask: Tensor, max_superpixels: int = 5, superpixel_area: float = 100.0
) -> tuple[Tensor, Tensor]:
    """Initial superpixel seeds of binary masks (official ``util/seed_init.py``).

    The number of superpixels is ``min(round(area / superpixel_area), max_superpixels)``
    (``np.round``: halves to even). Seeds are placed one at a time at the first (row-major)
    maximum of the Euclidean distance transform of the mask cropped to its bounding box; the
    chosen pixel then becomes background, so the next seed lies far from it and from the edge.
    The official ``gaussian_filter(sigma=0.1)`` has a kernel radius of 0 and is the identity, so
    it is omitted; the transform is updated incrementally instead of recomputed, which is exact.
    When the box holds no background, ``scipy.ndimage.distance_transform_edt`` measures from
    the virtual point (row -1, column 0) of the box; this is reproduced.

    Args:
        mask: [N, h, w] support foreground at feature resolution (nearest resizing).
        max_superpixels: Upper bound of the number of superpixels (official ``max_sp``: 5).
        superpixel_area: Mask pixels per superpixel (official ``avg_sp_area``: 100).

    Returns:
        ``seeds`` [N, max_superpixels, 2] long (row, column), meaningful for the first ``num``
        entries, and ``num`` [N] long. The official model infers the count from the nonzero
        coordinates, which undercounts (and drops the last seed) when one seed lies in row 0 and
        one in column 0; the count is returned here instead.
    """
    mask = mask.bool()
    n, h, w = mask.shape
    area = mask.sum((1, 2))
    num = torch.minimum(torch.round(area / superpixel_area).clamp(max=max_superpixels), area)

    ys = torch.arange(h, device=mask.device)
    xs = torch.arange(w, device=mask.device)
    rows, cols = mask.any(2), mask.any(1)
    y0, y1 = torch.where(rows, ys, h).amin(1), torch.where(rows, ys, -1).amax(1)
    x0, x1 = torch.where(cols, xs, w).amin(1), torch.where(cols, xs, -1).amax(1)
    in_rows = (ys >= y0[:, None]) & (ys <= y1[:, None])
    in_cols = (xs >= x0[:, None]) & (xs <= x1[:, None])
    zeros = in_rows[:, :, None] & in_cols[:, None, :] & ~mask

    dist2 = _squared_edt(zeros)
    no_zeros = ~zeros.flatten(1).any(1)
    virtual = _squared_distance_to(torch.stack([y0 - 1, x0], 1), (h, w))
    score = torch.where(no_zeros[:, None, None], virtual, dist2)
    seeds = torch.zeros(n, max_superpixels, 2, dtype=torch.long, device=mask.device)
    for i in range(max_superpixels):
        flat = score.masked_fill(~mask, -1.0).flatten(1).argmax(1)
        seeds[:, i, 0], seeds[:, i, 1] = flat // w, flat % w
        dist2 = torch.minimum(dist2, _squared_distance_to(seeds[:, i], (h, w)))
        score = dist2
    return seeds, num.long()


def superpixel_clustering(feats: Tensor, roi: Tensor, seeds: Tensor, num_iterations: int) -> Tensor:
    """Superpixel-guided clustering of support features (official ``sp_center_iter``).

    Pixels of the region are points in (feature, row, column) space; each iteration computes
    ``d = sqrt(|f - c_f|^2 + |xy - c_xy|^2 / 100)``, the association ``exp(-d)`` normalised over
    the region's pixels for each superpixel, and the centres as association-weighted sums.
    Vectorised over episodes and seeds; the normalisation is a masked softmax over pixels
    (the same value as ``exp(-d) / sum exp(-d)``, without its underflow to 0/0 when features are
    far apart), and squared feature distances use the ``|a|^2 + |b|^2 - 2ab`` expansion.
    Runs in fp32 with autocast off.

    Args:
        feats: [N, C, h, w] support features.
        roi: [N, h, w] bool clustering region (support foreground).
        seeds: [N, S, 2] long (row, column) initial centres.
        num_iterations: Official 10 in training, 5 in evaluation.

    Returns:
        [N, S, C] feature part of the centres (the prototypes).
    """
    n, c, h, w = feats.shape
    with torch.autocast(feats.device.type, enabled=False):
        feats = feats.float().flatten(2).transpose(1, 2)  # [N, P, C]
        rows = torch.arange(h, device=feats.device).repeat_interleave(w)
        cols = torch.arange(w, device=feats.device).repeat(h)
        coords = torch.stack([rows, cols], 1).float().expand(n, -1, -1)  # [N, P, 2]
        points = torch.cat([feats, coords], 2)  # [N, P, C + 2]
        index = seeds[..., 0] * w + seeds[..., 1]
        centres = points.gather(1, index[..., None].expand(-1, -1, c + 2))  # [N, S, C + 2]
        outside = ~roi.flatten(1)[:, :, None]
        feats_sq = feats.square().sum(2, keepdim=True)
        for _ in range(num_iterations):
            centre_feats, centre_coords = centres[..., :c], centres[..., c:]
            feat_d2 = feats_sq + centre_feats.square().sum(2)[:, None]
            feat_d2 = (feat_d2 - 2 * feats @ centre_feats.transpose(1, 2)).clamp(min=0)
            spatial_d2 = (coords[:, :, None] - centre_coords[:, None]).square().sum(3)
            dist = (feat_d2 + spatial_d2 / SPATIAL_SCALE).sqrt()  # [N, P, S]
            assoc = (-dist).masked_fill(outside, torch.finfo(dist.dtype).min).softmax(1)
            centres = assoc.transpose(1, 2) @ points
        return centres[..., :c]


def guided_prototype_allocation(
    query: Tensor, prototypes: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Allocate to every query pixel its most similar prototype (paper Sec. 3.3).

    Args:
        query: [B, C, h, w] query features.
        prototypes: [B, M, C], padded; ``valid`` [B, M] bool marks the real ones.

    Returns:
        ``prob`` [B, 1, h, w], the sum of the cosine similarities to all valid prototypes
        (with a single prototype, the similarity itself, as the official K=1 branch), and
        ``guide`` [B, C, h, w], the allocated prototype of each pixel (argmax of the
        similarity), both in the query's dtype.
    """
    b, c, h, w = query.shape
    similarity = cosine_similarity_map(query, prototypes)  # [B, M, h, w] fp32
    valid = valid[:, :, None, None]
    prob = (similarity * valid).sum(1, keepdim=True)
    index = similarity.masked_fill(~valid, float("-inf")).argmax(1)  # [B, h, w]
    guide = prototypes.gather(1, index.view(b, h * w, 1).expand(-1, -1, c))
    guide = guide.transpose(1, 2).reshape(b, c, h, w)
    return prob.to(query.dtype), guide.to(query.dtype)


class ASGNetHead(FeatureEnrichment):
    """ASGNet's prototype learning, allocation and decoder (pyramid variant).

    From the official ``model/asgnet.py`` (names and shapes kept, so its checkpoints load):

    * ``down_conv``: layer3 and layer2 concatenated, 1x1 conv without bias, Dropout2d(0.5), no
      ReLU; one module for query and support.
    * Superpixel-guided clustering (:func:`place_seeds`, :func:`superpixel_clustering`): seeds
      from the support mask resized to feature size with nearest neighbour (the official data
      loader resizes to 1/8 with ``cv2.INTER_NEAREST``), clustering on the pixels where the
      bilinear ``align_corners`` mask is 1, ``train_iterations`` (10) in training and
      ``eval_iterations`` (5) in evaluation. With fewer than 2 superpixels, the prototype is
      the masked average (``Weighted_GAP``) of the bilinear mask. As in the official code the
      prototypes are computed under ``torch.no_grad`` (no gradient reaches ``down_conv`` through
      the support), so the support branch runs without autograd.
    * K shots: all shots' prototypes are pooled (concatenated) before allocation.
    * Guided prototype allocation (:func:`guided_prototype_allocation`): the guide feature is
      the query concatenated with the allocated prototype (2 x reduce_dim channels), plus the
      probability map.
    * Decoder (PFENet's feature enrichment, official ``pyramid: True``): the
      :class:`~tasks.heads.fem.FeatureEnrichment` this head and :class:`PFENetHead` share, on
      the guide feature and the probability map. Auxiliary loss weight 1.0 (``aux_weight`` in
      the configs), averaged over bins.

    The ASPP variant (``pyramid: False``) is not implemented.

    Official checkpoint key map (after stripping ``module.``; ``i`` indexes the bins):
    ``down_conv.0.weight``; ``corr_conv.{i}.0.weight``; ``alpha_conv.{i-1}.0.weight``;
    ``beta_conv.{i}.{0,2}.weight``; ``inner_cls.{i}.0.weight``, ``inner_cls.{i}.3.{weight,bias}``;
    ``res1.0.weight``; ``res2.{0,2}.weight``; ``cls.0.weight``, ``cls.3.{weight,bias}`` map to
    the same names here. ``layer0.*`` .. ``layer4.*`` belong to the backbone and are returned
    by :meth:`~tasks.heads.fem.FeatureEnrichment.load_official_state_dict`, not loaded.

    Deviations, all for vectorisation or robustness: everything is batched over episodes,
    shots and superpixels, with prototypes padded to ``max_superpixels`` per shot and a
    validity mask (no Python loops over the batch); clustering uses a masked softmax; the seed
    count is returned rather than inferred; an episode whose clustering region is empty
    falls back to masked average pooling (the official code would produce NaN); bins are
    clamped per side (see :func:`~tasks.heads.fem.pyramid_bin_size`); the superpixel count is
    taken on the feature grid, which is the official 1/8 grid at output stride 8 (at stride 16
    each feature pixel covers 4 such pixels; scale ``superpixel_area`` by 1/4 to keep the
    official counts).

    Args:
        features: The encoder's outputs; the head reads the mid-level ones
            (:func:`~tasks.heads.common.mid_level_layers`).
        reduce_dim: Channels of the reduced features (official 256).
        bins: Pyramid bins, absolute sizes (> 1) or fractions of the feature size (<= 1).
        max_superpixels: Official ``max_sp``, 5.
        superpixel_area: Mask pixels per superpixel, official 100.
        train_iterations: Clustering iterations in training, official 10.
        eval_iterations: Clustering iterations in evaluation, official 5.
        aux_weight: Weight of the mean auxiliary loss, official 1.0.
        dropout: Dropout2d probability of ``down_conv``, official 0.5.
    """

    official_paper = "ASGNet"
    official_signature = "down_conv.0.weight"

    def __init__(
        self,
        features: FeaturePyramid,
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        max_superpixels: int = 5,
        superpixel_area: float = 100.0,
        train_iterations: int = 10,
        eval_iterations: int = 5,
        aux_weight: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        check_dropout(self, dropout=dropout)
        super().__init__(reduce_dim, bins)
        # the deepest stage is not used (Li et al., Sec. 4.1)
        self.in_features = self.mid_level = mid_level_layers(features)
        self.max_superpixels = max_superpixels
        self.superpixel_area = superpixel_area
        self.train_iterations = train_iterations
        self.eval_iterations = eval_iterations
        self.aux_weight = aux_weight

        self.down_conv = nn.Sequential(
            nn.Conv2d(mid_level_channels(features), reduce_dim, 1, bias=False),
            nn.Dropout2d(dropout),
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
        batch = support_masks.shape[0]
        query = self.down_conv(mid_level_features(query_feats, self.mid_level))
        with torch.no_grad():
            support = self.down_conv(mid_level_features(support_feats, self.mid_level))
            prototypes, valid = self.support_prototypes(support, support_masks)
        prototypes = prototypes.reshape(batch, -1, prototypes.shape[-1])
        prob, allocated = guided_prototype_allocation(query, prototypes, valid.view(batch, -1))
        logits, aux_logits = self.decode(torch.cat([query, allocated], 1), prob)
        return HeadOutput(logits=logits, aux_logits=aux_logits, aux_weight=self.aux_weight)

    def support_prototypes(self, support: Tensor, support_masks: Tensor) -> tuple[Tensor, Tensor]:
        """[B*K, C, h, w] features and [B, K, H, W] labels -> prototypes [B*K, S, C] and their
        validity [B*K, S], S = ``max_superpixels``."""
        size = support.shape[-2:]
        soft = foreground_masks(support_masks, size)
        hard = (support_masks == 1).flatten(0, 1)[:, None].float()
        hard = F.interpolate(hard, size=size, mode="nearest")[:, 0] > 0.5
        seeds, num = place_seeds(hard, self.max_superpixels, self.superpixel_area)
        roi = soft[:, 0] >= 1 - ROI_TOLERANCE
        iterations = self.train_iterations if self.training else self.eval_iterations
        centres = superpixel_clustering(support, roi, seeds, iterations)
        pooled = masked_average_pooling(support, soft)

        clustered = (num >= 2) & roi.flatten(1).any(1)
        slots = torch.arange(self.max_superpixels, device=support.device)
        valid = torch.where(clustered[:, None], slots < num[:, None], slots == 0)
        prototypes = torch.where(clustered[:, None, None], centres, pooled[:, None])
        return prototypes, valid
