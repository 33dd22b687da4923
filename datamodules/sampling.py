"""Which episodes a stage draws: the sampling rules of the published protocols.

Every rule is a deterministic function of its inputs and a seed, so the list does not depend on
loader workers or processes (:class:`datamodules.sampler.EpisodeSampler` shards it). The rules
(:mod:`datamodules.protocols` says which paper uses which):

* ``balanced`` -- this project's evaluation rule: every class gets ``count // C`` episodes (the
  remainder to randomly chosen classes), its queries in shuffled passes over its images. mIoU is
  a mean over classes, so each class's IoU is estimated from the same number of episodes and,
  with ``count >= C``, no class is missing.
* ``pairs`` -- shuffled passes over all (image, class) pairs (training; episodes in proportion to
  images, as PFENet's and HSNet's training loaders iterate their lists).
* ``image_walk`` -- PFENet's test loader: the listed images in list order, cycling; each episode's
  class drawn uniformly among the classes the query may be asked for.
* ``image_passes`` -- PFENet's training loader: the same images in shuffled passes.
* ``pair_walk`` -- HSNet's PASCAL test loader: (image, class) pairs in list order, cycling.
* ``class_first`` -- HSNet's COCO loader: a class uniformly, then one of its images.

Supports are ``shots`` images of the episode's class other than the query, distinct unless
``support_repeats`` (HSNet redraws a support only when it equals the query).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from .episode import Episode
from .sampler import draw_episodes

Rule = Literal["balanced", "pairs", "image_walk", "image_passes", "pair_walk", "class_first"]
WalkItem = tuple[str, tuple[int, ...]]


def walk_items(
    counts: Mapping[str, Mapping[int, int]],
    image_ids: Sequence[str],
    classes: Sequence[int],
    min_pixels: int,
    present: bool,
    exclude: Sequence[int] = (),
) -> list[WalkItem]:
    """The images of a PFENet-style list, in list order, with the classes each may be queried
    for: an image enters when one of ``classes`` covers ``min_pixels`` (``make_dataset``); it is
    then queried for any of ``classes`` it shows at all (``present``, PFENet's ``__getitem__``)
    or only for those that pass the threshold. Images showing a class of ``exclude`` are
    dropped (BAM's training list)."""
    items = []
    for image_id in image_ids:
        image_counts = counts[image_id]
        if set(exclude).intersection(image_counts):
            continue
        eligible = tuple(c for c in classes if image_counts.get(c, 0) >= min_pixels)
        if eligible:
            shown = tuple(c for c in classes if image_counts.get(c, 0) > 0)
            items.append((image_id, shown if present else eligible))
    return items


def pair_items(walk: Sequence[WalkItem]) -> list[WalkItem]:
    """One item per (image, class) pair, in list order then class order (HSNet's split lists)."""
    return [(image_id, (cls,)) for image_id, classes in walk for cls in classes]


@dataclass(frozen=True)
class EpisodeRule:
    """A sampling rule with its inputs; ``draw(count, seed)`` gives the episode list.

    Args:
        rule: one of the rules of the module docstring.
        pools: class -> images eligible as supports (and as queries for ``balanced``,
            ``pairs`` and ``class_first``).
        shots: support images per episode.
        walk: the ordered queries of the walking rules (:func:`walk_items`, :func:`pair_items`).
        support_repeats: draw supports with replacement (never the query).
    """

    rule: Rule
    pools: Mapping[int, Sequence[str]]
    shots: int
    walk: Sequence[WalkItem] = ()
    support_repeats: bool = False

    def draw(self, count: int, seed: Sequence[int]) -> list[Episode]:
        if self.rule == "pairs":
            return draw_episodes(self.pools, count, self.shots, seed)
        rng = np.random.default_rng(list(seed))
        if self.rule == "balanced":
            queries = self._balanced(count, rng)
        elif self.rule == "class_first":
            classes = sorted(self.pools)
            queries = []
            for cls in rng.choice(classes, size=count).tolist():
                pool = self.pools[cls]
                queries.append((pool[int(rng.integers(len(pool)))], cls))
        else:
            queries = self._walk(count, rng)
        return [Episode(query, cls, self._supports(rng, query, cls)) for query, cls in queries]

    def _balanced(self, count: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        classes = sorted(self.pools)
        shares = [count // len(classes)] * len(classes)
        for index in rng.permutation(len(classes))[: count % len(classes)]:
            shares[index] += 1
        queries = []
        for cls, share in zip(classes, shares, strict=True):
            pool = self.pools[cls]
            order: list[int] = []
            while len(order) < share:
                order.extend(rng.permutation(len(pool)).tolist())
            queries.extend((pool[i], cls) for i in order[:share])
        return [queries[i] for i in rng.permutation(len(queries))]

    def _walk(self, count: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        if not self.walk:
            raise ValueError("no image qualifies as a query: the episode list would be empty")
        if self.rule == "image_passes":
            order: list[int] = []
            while len(order) < count:
                order.extend(rng.permutation(len(self.walk)).tolist())
        else:
            order = [i % len(self.walk) for i in range(count)]
        queries = []
        for index in order[:count]:
            image_id, classes = self.walk[index]
            cls = classes[int(rng.integers(len(classes)))] if len(classes) > 1 else classes[0]
            queries.append((image_id, cls))
        return queries

    @cached_property
    def _positions(self) -> dict[int, dict[str, int]]:
        return {
            cls: {image_id: i for i, image_id in enumerate(pool)}
            for cls, pool in self.pools.items()
        }

    def _supports(self, rng: np.random.Generator, query: str, cls: int) -> tuple[str, ...]:
        pool = self.pools[cls]
        position = self._positions[cls].get(query)
        candidates = len(pool) - (position is not None)
        needed = 1 if self.support_repeats else self.shots
        if candidates < needed:
            raise ValueError(
                f"class {cls}: {candidates} support candidates besides query {query!r}, "
                f"{self.shots}-shot episodes need {needed}"
            )
        picks = rng.choice(candidates, size=self.shots, replace=self.support_repeats)
        if position is not None:
            picks[picks >= position] += 1  # skip the query's own position
        return tuple(pool[i] for i in picks.tolist())
