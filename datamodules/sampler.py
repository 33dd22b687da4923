"""Episode drawing and sharding across processes.

Validation and test use a fixed list of ``N`` episodes drawn in the main process from a seed, so
the list does not depend on the number of loader workers or processes. Under DDP rank ``r`` of
``W`` evaluates episodes ``r, r + W, r + 2W, ...``: every episode exactly once, no padding.
(PFENet/ASGNet evaluate everything on every rank; Lightning's ``DistributedSampler`` pads the last
shard with repeated samples.)

Training draws a new list every epoch from ``(seed, epoch)``, one sequence whatever the number of
processes: optimizer step ``s`` uses episodes ``s*G .. s*G + G - 1`` of it (``G`` the global batch),
rank ``r`` of ``W`` taking the contiguous block ``s*G + r*G/W ..`` (split into micro-batches when
gradients are accumulated). So one process with batch 8 and two with batch 4 train on the same
episodes in each step. The list is cut to whole steps, and each training episode carries its own
augmentation seed, so its crops and flips do not depend on which process or worker loads it.

These samplers are :class:`~torch.utils.data.DistributedSampler` subclasses, so Lightning keeps
them as they are under any trainer setting (it only replaces samplers that are not; see
:class:`ShardedSampler`). Ranks may see different numbers of evaluation batches, so aggregate
metrics with torchmetrics ``Metric`` objects (synced in ``compute()``), never with per-step
``self.log(..., sync_dist=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler

from .episode import Episode

_AUGMENT = 1  # appended to a training list's seed for its episodes' augmentation seeds


def step_batches(global_batch_size: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """``(episodes per batch on one device, batches accumulated per optimizer step)`` that make
    ``global_batch_size`` episodes per step on ``world_size`` processes with at most
    ``batch_size`` episodes per device batch (the fewest accumulated batches that divide evenly).
    """
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} cannot be split over {world_size} "
            "training processes (trainer.devices x trainer.num_nodes): use a multiple of "
            f"{world_size}, or another number of devices"
        )
    per_rank = global_batch_size // world_size
    accumulate = next(
        a for a in range(-(-per_rank // batch_size), per_rank + 1) if per_rank % a == 0
    )
    return per_rank // accumulate, accumulate


def draw_episodes(
    pools: Mapping[int, Sequence[str]], count: int, shots: int, seed: Sequence[int]
) -> list[Episode]:
    """``count`` episodes over the (query image, class) pairs of ``pools``.

    Queries run through shuffled passes over all pairs, as PFENet and HSNet iterate their
    (image, class) lists; each support set is ``shots`` distinct images of the class other than
    the query, drawn uniformly.
    """
    classes = sorted(pools)
    pairs = [(cls, position) for cls in classes for position in range(len(pools[cls]))]
    rng = np.random.default_rng(list(seed))
    order: list[int] = []
    while len(order) < count:
        order.extend(rng.permutation(len(pairs)).tolist())
    episodes = []
    for pair in order[:count]:
        cls, position = pairs[pair]
        pool = pools[cls]
        picks = rng.choice(len(pool) - 1, size=shots, replace=False)
        picks[picks >= position] += 1  # skip the query's own position
        episodes.append(Episode(pool[position], cls, tuple(pool[i] for i in picks)))
    return episodes


class ShardedSampler(DistributedSampler):
    """Base of the samplers that shard their samples over processes themselves.

    A :class:`~torch.utils.data.DistributedSampler` by type only: Lightning replaces a loader's
    sampler under DDP unless it is one (``use_distributed_sampler``), and its replacement would
    pad the last shard with repeated samples. The parent's constructor (which computes padded
    shards of a sized dataset) is not used; subclasses define ``__iter__`` and ``__len__``.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.num_replicas, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop before each epoch."""
        self.epoch = epoch


class EpisodeSampler(ShardedSampler):
    """Yields this rank's share of an episode list (see the module docstring).

    Args:
        pools: class -> images where the class is eligible; each needs ``shots + 1`` images.
        count: episodes per epoch over all ranks.
        shots: support images per episode.
        seed: seed of the list; in training the epoch is appended, so each epoch is new.
        rank: this process's rank.
        world_size: number of processes.
        train: redraw every epoch, give every episode an augmentation seed and shard each
            optimizer step's episodes in contiguous blocks.
        step_episodes: training episodes of one rank per optimizer step (``global batch /
            world_size``); the list is cut to whole steps.
        draw: ``draw(count, seed)`` gives the list (a protocol's rule,
            :class:`datamodules.sampling.EpisodeRule`); default :func:`draw_episodes` over
            ``pools``.
    """

    def __init__(
        self,
        pools: Mapping[int, Sequence[str]],
        count: int,
        shots: int,
        seed: Sequence[int],
        rank: int = 0,
        world_size: int = 1,
        train: bool = False,
        step_episodes: int = 1,
        draw: Callable[[int, Sequence[int]], list[Episode]] | None = None,
    ) -> None:
        step = step_episodes * world_size
        if train and count < step:
            raise ValueError(
                f"{count} training episodes are fewer than one optimizer step of {step} "
                "(data.global_batch_size): raise data.train_episodes"
            )
        self.pools = pools
        self.draw = draw
        self.count = count - count % step if train else count
        self.shots = shots
        self.seed = tuple(seed)
        super().__init__(rank, world_size)
        self.world_size = world_size
        self.train = train
        self.step_episodes = step_episodes

    def episodes(self) -> list[Episode]:
        """The whole list of the current epoch, over all ranks."""
        seed = (*self.seed, self.epoch) if self.train else self.seed
        if self.draw is not None:
            episodes = self.draw(self.count, seed)
        else:
            episodes = draw_episodes(self.pools, self.count, self.shots, seed)
        if not self.train:
            return episodes
        augment = np.random.default_rng([*seed, _AUGMENT]).integers(2**63, size=len(episodes))
        return [replace(e, seed=int(s)) for e, s in zip(episodes, augment, strict=True)]

    def __iter__(self) -> Iterator[Episode]:
        episodes = self.episodes()
        if not self.train:
            return iter(episodes[self.rank :: self.world_size])
        block, step = self.step_episodes, self.step_episodes * self.world_size
        return (
            episode
            for start in range(self.rank * block, self.count, step)
            for episode in episodes[start : start + block]
        )

    def __len__(self) -> int:
        if self.train:
            return self.count // self.world_size
        return len(range(self.rank, self.count, self.world_size))


def rank_and_world_size(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a Lightning trainer, ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size
