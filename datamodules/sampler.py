"""Episode drawing and sharding across processes.

Validation and test use a fixed list of ``N`` episodes drawn in the main process from a seed, so
the list does not depend on the number of loader workers or processes. Under DDP rank ``r`` of
``W`` evaluates episodes ``r, r + W, r + 2W, ...``: every episode exactly once, no padding.
(PFENet/ASGNet evaluate everything on every rank; Lightning's ``DistributedSampler`` pads the last
shard with repeated samples.) Training draws a new list every epoch from ``(seed, epoch)``; its
shards are cut to equal lengths so that DDP ranks run the same number of steps.

DDP contract for the task: the trainer must not wrap these samplers, so pass
``Trainer(use_distributed_sampler=False)`` -- ``Trainer(**TRAINER_KWARGS)``, or in a LightningCLI
config ``trainer: {use_distributed_sampler: false}``. The datamodule raises if a multi-process
trainer keeps the default. Ranks may then see different numbers of evaluation batches, so
aggregate metrics with torchmetrics ``Metric`` objects (synced in ``compute()``), never with
per-step ``self.log(..., sync_dist=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .episode import Episode

TRAINER_KWARGS: dict[str, Any] = {"use_distributed_sampler": False}


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


class EpisodeSampler(Sampler[Episode]):
    """Yields this rank's share of an episode list (see the module docstring).

    Args:
        pools: class -> images where the class is eligible; each needs ``shots + 1`` images.
        count: episodes per epoch over all ranks.
        shots: support images per episode.
        seed: seed of the list; in training the epoch is appended, so each epoch is new.
        rank: this process's rank.
        world_size: number of processes.
        train: redraw every epoch and cut shards to equal lengths.
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
        draw: Callable[[int, Sequence[int]], list[Episode]] | None = None,
    ) -> None:
        self.pools = pools
        self.draw = draw
        self.count = count - count % world_size if train else count
        self.shots = shots
        self.seed = tuple(seed)
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop before each epoch."""
        self.epoch = epoch

    def episodes(self) -> list[Episode]:
        """The whole list of the current epoch, over all ranks."""
        seed = (*self.seed, self.epoch) if self.train else self.seed
        if self.draw is not None:
            return self.draw(self.count, seed)
        return draw_episodes(self.pools, self.count, self.shots, seed)

    def __iter__(self) -> Iterator[Episode]:
        return iter(self.episodes()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.count, self.world_size))


def rank_and_world_size(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a Lightning trainer, ``(0, 1)`` without one.

    Raises if a multi-process trainer would wrap the samplers in a padding ``DistributedSampler``.
    """
    if trainer is None:
        return 0, 1
    connector = getattr(trainer, "_accelerator_connector", None)
    if trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
        raise RuntimeError(
            "these datamodules shard their samples themselves: create the Trainer with "
            "use_distributed_sampler=False (datamodules.TRAINER_KWARGS), otherwise Lightning "
            "pads and re-shards the evaluation episodes"
        )
    return trainer.global_rank, trainer.world_size
