"""The episodic LightningDataModule shared by PASCAL-5i, COCO-20i and shapes.

Stages and the data they use (the batch format is in :mod:`datamodules.episode`, the DDP contract
in :mod:`datamodules.sampler`):

* ``fit`` -- training episodes over the **base** classes of the training list, minus the
  held-out images (:func:`datamodules.splits.hold_out`); validation episodes over the **base**
  classes of the held-out images, so checkpoint selection never sees a novel class (PFENet, HSNet
  and ASGNet select on the test fold).
* ``test`` -- episodes over the **novel** classes of the test list (VOC val / COCO val2014),
  one loader per test seed, evaluated as the chosen protocol says (:mod:`datamodules.protocols`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from .episode import EpisodeDataset, Evaluation, collate_episodes
from .index import ClassCounts, class_counts
from .predict import PredictEpisodes
from .protocols import EvalResize, Scoring, resolve_protocol
from .sampler import EpisodeSampler, rank_and_world_size, step_batches
from .source import SegmentationSource
from .splits import NUM_FOLDS, eligible_images, hold_out
from .transforms import eval_transform, train_transform

Split = Literal["train", "test"]
_STAGE_CODE = {"val": 0, "test": 1}


def data_dir() -> Path:
    """Root of downloads, generated data and caches: ``$FEWSHOT_DATA_DIR`` or
    ``~/.cache/fewshot-dilated``."""
    return Path(os.environ.get("FEWSHOT_DATA_DIR", Path.home() / ".cache" / "fewshot-dilated"))


def write_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """Create ``folder`` with ``write(tmp)`` into a temporary sibling renamed at the end, so
    concurrent processes and interrupted runs never leave a partial folder behind."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write(partial)
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def require(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class FewShotDataModule(LightningDataModule):
    """Episodic few-shot segmentation data for one fold.

    Args:
        root: dataset root (layout per subclass).
        fold: cross-validation fold, 0..3.
        shots: support images per episode (K >= 1).
        image_size: square training crop and evaluation canvas.
        batch_size: episodes per batch on one device (with ``global_batch_size``: at most).
        global_batch_size: training episodes per optimizer step over all devices; the batch of
            each device and the gradient accumulation follow from it and the number of
            processes, so a recipe trains the same on 1, 2, 4 or 8 devices
            (:func:`datamodules.sampler.step_batches`). ``None``: ``batch_size`` per device.
        num_workers: loader worker processes.
        train_episodes: training episodes per epoch; ``None`` = one per (image, base class) pair
            of the training list, as PFENet's epoch.
        val_episodes: fixed validation episodes (base classes, held-out images).
        seed: seed of the validation list.
        protocol: evaluation preset (``pfenet``, ``asgnet``, ``hsnet``, ``bam``; ``None``: this
            project's defaults) setting the five options below (:mod:`datamodules.protocols`).
        test_episodes: fixed test episodes per seed (novel classes, test list).
        test_seeds: seeds of the test lists, or their number (the preset's first seed onwards);
            each seed is one test pass, reported separately and as mean and std.
        eval_resize: ``longer_pad`` (PFENet) or ``squash`` (HSNet) test resize.
        eval_size: test input size (default: ``image_size``).
        scoring: score test predictions at the ``original`` label or at the ``input`` size.
        exclude_novel_from_train: drop training images holding any novel-class pixel (BAM).
        min_pixels: pixels a class needs in an image to be used there (OSLSM: 2 * 32 * 32).
        val_fraction: share of each class's training images held out for validation.
        cache_dir: where the class index is cached; ``None`` = :meth:`default_cache_dir`.
        predict_support: ``predict`` only: support image files (the K shots).
        predict_support_masks: ``predict`` only: one mask PNG per support image.
        predict_queries: ``predict`` only: query image files or folders of images.
    """

    num_classes: int
    class_names: list[str]
    #: which column of a protocol's per-dataset values applies (:mod:`datamodules.protocols`)
    protocol_family = "pascal"

    def __init__(
        self,
        root: str | None = None,
        fold: int = 0,
        shots: int = 1,
        image_size: int = 473,
        batch_size: int = 4,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        train_episodes: int | None = None,
        val_episodes: int = 1000,
        seed: int = 321,
        protocol: str | None = None,
        test_episodes: int | None = None,
        test_seeds: int | list[int] | None = None,
        eval_resize: EvalResize | None = None,
        eval_size: int | None = None,
        scoring: Scoring | None = None,
        exclude_novel_from_train: bool | None = None,
        min_pixels: int = 2 * 32 * 32,
        val_fraction: float = 0.1,
        cache_dir: str | None = None,
        predict_support: list[str] | None = None,
        predict_support_masks: list[str] | None = None,
        predict_queries: list[str] | None = None,
    ) -> None:
        super().__init__()
        require("fold", fold, fold in range(NUM_FOLDS), f"one of {list(range(NUM_FOLDS))}")
        require("shots", shots, shots >= 1, "an integer >= 1")
        require("image_size", image_size, image_size >= 8, "an integer >= 8")
        require("batch_size", batch_size, batch_size >= 1, "an integer >= 1")
        require(
            "global_batch_size",
            global_batch_size,
            global_batch_size is None or global_batch_size >= 1,
            "None or an integer >= 1",
        )
        require("num_workers", num_workers, num_workers >= 0, "an integer >= 0")
        require(
            "train_episodes",
            train_episodes,
            train_episodes is None or train_episodes >= 1,
            "None or an integer >= 1",
        )
        require("val_episodes", val_episodes, val_episodes >= 1, "an integer >= 1")
        for name, value in (("test_episodes", test_episodes), ("eval_size", eval_size)):
            require(name, value, value is None or value >= 1, "None or an integer >= 1")
        require("min_pixels", min_pixels, min_pixels >= 1, "an integer >= 1")
        require("val_fraction", val_fraction, 0 < val_fraction < 1, "in the open interval (0, 1)")
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else self.default_root()
        self.fold = fold
        self.shots = shots
        self.image_size = image_size
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.train_episodes = train_episodes
        self.val_episodes = val_episodes
        self.seed = seed
        self.protocol = resolve_protocol(
            protocol,
            self.protocol_family,
            {
                "test_episodes": test_episodes,
                "test_seeds": test_seeds,
                "eval_resize": eval_resize,
                "eval_size": eval_size,
                "scoring": scoring,
                "exclude_novel_from_train": exclude_novel_from_train,
            },
            image_size,
        )
        self.min_pixels = min_pixels
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.default_cache_dir()
        self.novel_classes = self.fold_novel_classes()
        self.base_classes = [c for c in range(self.num_classes) if c not in self.novel_classes]
        self._sources: dict[Split, SegmentationSource] = {}
        self._pools: dict[str, dict[int, list[str]]] = {}

    @abstractmethod
    def default_root(self) -> Path:
        """Root used when ``root`` is ``None``."""

    def default_cache_dir(self) -> Path:
        """Index cache used when ``cache_dir`` is ``None``: ``data_dir()/index`` (dataset roots
        are often read-only)."""
        return data_dir() / "index"

    @abstractmethod
    def fold_novel_classes(self) -> list[int]:
        """0-based novel classes of ``self.fold``."""

    @abstractmethod
    def make_source(self, split: Split) -> SegmentationSource:
        """The training or test split; raises with the expected layout if files are missing."""

    def source(self, split: Split) -> SegmentationSource:
        if split not in self._sources:
            self._sources[split] = self.make_source(split)
        return self._sources[split]

    def counts(self, split: Split) -> ClassCounts:
        """Class pixel counts of every image of ``split`` (cached on disk)."""
        return class_counts(self.source(split), self.cache_dir)

    def prepare_data(self) -> None:
        """Build (or check) both class index caches once, on one process per node."""
        for split in ("train", "test"):
            self.counts(split)

    @property
    def test_seeds(self) -> list[int]:
        return self.protocol["test_seeds"]

    def setup(self, stage: str | None = None) -> None:
        """Build the episode pools of ``stage`` (``fit``/``validate``: train + val; ``test``);
        the resolved protocol goes to the trainer's loggers (the W&B run's config)."""
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"protocol": self.protocol})
        if stage == "predict":
            return
        if stage == "fit":
            self._set_accumulation()
        if stage in (None, "fit", "validate") and "val" not in self._pools:
            counts = self.counts("train")
            held = hold_out(counts, self.val_fraction, self.min_pixels)
            train_ids = [image_id for image_id in counts if image_id not in held]
            excluded = self.novel_classes if self.protocol["exclude_novel_from_train"] else ()
            self._pools["train"] = self._checked(
                "train",
                eligible_images(counts, train_ids, self.base_classes, self.min_pixels, excluded),
            )
            self._pools["val"] = self._checked(
                "val", eligible_images(counts, held, self.base_classes, self.min_pixels)
            )
        if stage in (None, "test") and "test" not in self._pools:
            counts = self.counts("test")
            self._pools["test"] = self._checked(
                "test", eligible_images(counts, counts, self.novel_classes, self.min_pixels)
            )

    def train_batches(self) -> tuple[int, int]:
        """``(episodes per device batch, batches accumulated per optimizer step)`` in training."""
        if self.global_batch_size is None:
            return self.batch_size, 1
        _, world_size = rank_and_world_size(self.trainer)
        return step_batches(self.global_batch_size, self.batch_size, world_size)

    def _set_accumulation(self) -> None:
        """The trainer accumulates the batches that ``global_batch_size`` asks for; an explicit,
        different ``trainer.accumulate_grad_batches`` is an error naming both."""
        if self.trainer is None or self.global_batch_size is None:
            return
        accumulate = self.train_batches()[1]
        if self.trainer.accumulate_grad_batches not in (1, accumulate):
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} "
                f"conflicts with data.global_batch_size={self.global_batch_size}, which sets "
                "the accumulation itself: leave trainer.accumulate_grad_batches at 1"
            )
        self.trainer.accumulate_grad_batches = accumulate

    def _checked(self, stage: str, pools: dict[int, list[str]]) -> dict[int, list[str]]:
        short = {c: len(ids) for c, ids in pools.items() if len(ids) < self.shots + 1}
        if short:
            details = ", ".join(
                f"{self.class_names[c]!r} (class {c}): {n}" for c, n in short.items()
            )
            raise ValueError(
                f"{type(self).__name__} fold {self.fold}, {stage} split: {self.shots}-shot "
                f"episodes need at least {self.shots + 1} images per class with "
                f">= {self.min_pixels} pixels of it; too few for {details}"
            )
        return pools

    def pools(self, stage: str) -> dict[int, list[str]]:
        """Class -> eligible images for ``stage`` in ``train``, ``val``, ``test`` (after setup)."""
        if stage not in self._pools:
            raise RuntimeError(f"call setup() before asking for the {stage!r} episodes")
        return self._pools[stage]

    def sampler(self, stage: str, test_seed: int | None = None) -> EpisodeSampler:
        """The episode sampler of ``stage`` for this process (sharded under DDP); ``test`` takes
        one of :attr:`test_seeds` (default the first)."""
        rank, world_size = rank_and_world_size(self.trainer)
        pools = self.pools(stage)
        if stage == "train":
            seed = torch.initial_seed()  # set by Lightning's seed_everything
            if self.trainer is not None:
                seed = self.trainer.strategy.broadcast(seed, src=0)
            count = self.train_episodes or sum(len(ids) for ids in pools.values())
            batch, accumulate = self.train_batches()
            return EpisodeSampler(
                pools, count, self.shots, (seed,), rank, world_size, True, batch * accumulate
            )
        if stage == "val":
            count, seed = self.val_episodes, self.seed
        else:
            count = self.protocol["test_episodes"]
            seed = self.test_seeds[0] if test_seed is None else test_seed
        codes = (seed, self.fold, self.shots, _STAGE_CODE[stage])
        return EpisodeSampler(pools, count, self.shots, codes, rank, world_size)

    def _loader(self, stage: str, test_seed: int | None = None) -> DataLoader:
        if stage == "train":
            dataset = EpisodeDataset(self.source("train"), train_transform(self.image_size))
        elif stage == "val":
            evaluation = Evaluation(self.image_size)
            transform = eval_transform(evaluation.size, evaluation.resize)
            dataset = EpisodeDataset(self.source("train"), transform, evaluation)
        else:
            p = self.protocol
            evaluation = Evaluation(p["eval_size"], p["eval_resize"], p["scoring"])
            transform = eval_transform(evaluation.size, evaluation.resize)
            dataset = EpisodeDataset(self.source("test"), transform, evaluation)
        return DataLoader(
            dataset,
            batch_size=self.train_batches()[0] if stage == "train" else self.batch_size,
            sampler=self.sampler(stage, test_seed),
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and stage != "test",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test seed, in the order of :attr:`test_seeds`."""
        return [self._loader("test", seed) for seed in self.test_seeds]

    def predict_dataloader(self) -> DataLoader:
        """The user's queries, each segmented with the given support set (no labels needed)."""
        hp = self.hparams
        dataset = PredictEpisodes(
            hp.predict_support or [],
            hp.predict_support_masks or [],
            hp.predict_queries or [],
            eval_transform(self.image_size),
            self.image_size,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
        )
