"""Class folds and the held-out validation split.

Fold definitions (0-based class indices, i.e. 1-based dataset class ``k`` is index ``k - 1``):

* PASCAL-5i (Shaban et al., OSLSM): fold ``i`` has novel classes ``5i+1 .. 5i+5``.
* COCO-20i, interleaved (PFENet ``use_split_coco=True``, HSNet, ASGNet): fold ``i`` has novel
  classes ``i+1, i+5, ..., i+77`` among the 80 categories sorted by category id.
* COCO-20i, contiguous (PANet): fold ``i`` has novel classes ``20i+1 .. 20i+20``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Literal

NUM_FOLDS = 4
CocoSplit = Literal["interleaved", "contiguous"]


def pascal_novel_classes(fold: int) -> list[int]:
    """Novel classes of PASCAL-5i fold ``fold`` (VOC classes ``5i+1 .. 5i+5``)."""
    return list(range(5 * fold, 5 * fold + 5))


def coco_novel_classes(fold: int, split: CocoSplit) -> list[int]:
    """Novel classes of COCO-20i fold ``fold`` under either published convention."""
    if split == "interleaved":
        return list(range(fold, 80, NUM_FOLDS))
    if split == "contiguous":
        return list(range(20 * fold, 20 * fold + 20))
    raise ValueError(f"split must be 'interleaved' or 'contiguous', got {split!r}")


def _stable_rank(image_id: str) -> str:
    return hashlib.sha1(image_id.encode()).hexdigest()


def hold_out(counts: Mapping[str, Mapping[int, int]], fraction: float, min_pixels: int) -> set[str]:
    """Images held out of the training list for validation episodes.

    Stratified and deterministic: for every class, in class order, the images where it is
    eligible (``>= min_pixels``) are ranked by a hash of their id and taken until
    ``ceil(fraction * eligible)`` of them are held out (images already held out for an earlier
    class count). The split depends only on the data, never on the fold, so the same images are
    kept away from training whatever the fold. The reference repositories have no such split and
    select checkpoints on the test fold.
    """
    by_class: dict[int, list[str]] = {}
    for image_id, image_counts in counts.items():
        for cls, pixels in image_counts.items():
            if pixels >= min_pixels:
                by_class.setdefault(cls, []).append(image_id)
    held: set[str] = set()
    for cls in sorted(by_class):
        candidates = sorted(by_class[cls], key=_stable_rank)
        quota = math.ceil(fraction * len(candidates))
        have = sum(image_id in held for image_id in candidates)
        for image_id in candidates:
            if have >= quota:
                break
            if image_id not in held:
                held.add(image_id)
                have += 1
    return held


def eligible_images(
    counts: Mapping[str, Mapping[int, int]],
    image_ids: Iterable[str],
    classes: Iterable[int],
    min_pixels: int,
    exclude: Iterable[int] = (),
) -> dict[int, list[str]]:
    """Per class, the images where it covers at least ``min_pixels`` pixels.

    ``min_pixels = 2 * 32 * 32`` is the OSLSM rule kept by PFENet, ASGNet and HSNet. Images that
    contain any pixel of a class in ``exclude`` are dropped (BAM's training protocol).
    """
    excluded = set(exclude)
    pools: dict[int, list[str]] = {cls: [] for cls in classes}
    for image_id in sorted(image_ids):
        image_counts = counts[image_id]
        if excluded.intersection(image_counts):
            continue
        for cls, pool in pools.items():
            if image_counts.get(cls, 0) >= min_pixels:
                pool.append(image_id)
    return pools
