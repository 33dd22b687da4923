"""The episodic LightningDataModule: few-shot episodes of any :class:`SegmentationDataset`.

Stages and the data they use (the batch format is in :mod:`datamodules.episode`, the DDP contract
in :mod:`datamodules.sampler`):

* ``fit`` -- training episodes over the **base** classes of the training list, minus the
  held-out images (:func:`datamodules.splits.hold_out`); validation episodes over the **base**
  classes of the held-out images, so checkpoint selection never sees a novel class (PFENet, HSNet
  and ASGNet select on the test fold).
* ``test`` -- episodes over the **novel** classes of the test list (VOC val / COCO val2014),
  one loader per test seed, drawn and evaluated as the chosen protocol says
  (:mod:`datamodules.protocols`, :mod:`datamodules.sampling`).

No ``from __future__ import annotations`` here: the ranges must reach jsonargparse
(:mod:`datamodules.bounds`).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch.utils.data import DataLoader

from .bounds import (
    AtLeast8,
    NonNegativeInt,
    OpenFraction,
    PositiveInt,
    Probability,
    check_bounds,
    require,
)
from .dataset import SegmentationDataset, Split
from .episode import (
    Batch,
    EpisodeDataset,
    Evaluation,
    collate_episodes,
    input_dtype,
    to_model_inputs,
)
from .global_batch import GlobalBatchDataModule
from .index import ClassCounts, class_counts
from .predict import PredictEpisodes
from .protocols import (
    OPTIONS,
    BackboneNorm,
    EvalPad,
    EvalResize,
    LossReduction,
    ProtocolName,
    QueryClasses,
    Scoring,
    TestSampling,
    TrainIgnore,
    TrainSampling,
    episodes_per_pass,
    resolve_protocol,
)
from .sampler import EpisodeSampler, rank_and_world_size
from .sampling import EpisodeRule, pair_items, walk_items
from .source import SegmentationSource
from .splits import eligible_images, hold_out
from .transforms import eval_transform, train_transform

AugmentOn = Literal["cpu", "gpu"]
_STAGE_CODE = {"val": 0, "test": 1}


class FewShotDataModule(GlobalBatchDataModule):
    """Episodic few-shot segmentation data of one fold of a dataset.

    Options that default to ``None`` take the dataset's own value (:data:`DEFAULTS`, then the
    dataset's ``defaults["few_shot"]``), so a config that switches datasets never inherits
    another dataset's values (jsonargparse keeps the init_args the new class shares with the old
    one).

    Args:
        dataset: the data (:class:`datamodules.dataset.SegmentationDataset`).
        fold: cross-validation fold, ``0 .. dataset.num_folds - 1``.
        shots: support images per episode (K >= 1).
        image_size: square training crop and evaluation canvas.
        batch_size: episodes per batch on one device (with ``global_batch_size``: at most).
        global_batch_size: training episodes per optimizer step over all devices; the batch of
            each device and the gradient accumulation follow from it and the number of
            processes, so a recipe trains the same on 1, 2, 4 or 8 devices
            (:func:`datamodules.sampler.step_batches`). ``None``: ``batch_size`` per device.
        num_workers: loader worker processes.
        train_episodes: training episodes per epoch; ``None`` = the dataset's default, else
            its epoch (:meth:`train_epoch_length`).
        val_episodes: fixed validation episodes (base classes, held-out images).
        seed: seed of the validation list.
        protocol: the pipeline preset: ``clean`` (this project's, the default; also ``None``),
            ``pfenet``, ``asgnet``, ``hsnet`` or ``bam``, setting every option below down to
            ``base_learner_dropout``; each option given explicitly wins
            (:mod:`datamodules.protocols` has the table and the sources).
        test_episodes: test episodes per seed (novel classes, test list).
        extra_test_episode: one episode more than ``test_episodes`` (PFENet's/ASGNet's loop).
        max_test_passes: at most this many passes over the list of a walking ``test_sampling``
            (PFENet's/ASGNet's ``for e in range(20)``).
        test_seeds: seeds of the test lists, or their number (the preset's seeds first); each
            seed is one test pass, reported separately and as mean and std.
        test_sampling: ``balanced``, ``image_walk``, ``pair_walk`` or ``class_first``
            (:mod:`datamodules.sampling`).
        query_classes: a query is asked for a class it shows at all (``present``, PFENet) or
            only for one covering ``min_pixels`` (``eligible``).
        support_repeats: supports drawn with replacement (HSNet).
        eval_resize: ``longer_pad``, ``floor8`` (PFENet's ``Resize``) or ``squash`` (HSNet).
        eval_size: test input size (default: ``image_size``).
        eval_pad: the test canvas's padding: the ``mean`` colour or ``black`` (PFENet).
        scoring: score at the ``original`` label (crop, then resize), PFENet's ``square``
            (``ori_resize``: the padded output resized to the label's longer side) or at the
            ``input`` size (HSNet).
        train_sampling: training episodes over (image, class) ``pairs`` or one per listed
            ``images`` (PFENet).
        exclude_novel_from_train: drop training images holding any novel-class pixel (BAM).
        train_scale: random scale range of training crops.
        rotate_p: probability of the random rotation (PFENet's ``RandRotate``: 0.5).
        train_resize_longer: resize the longer side to ``image_size`` before augmenting (this
            project) rather than augmenting at the native resolution (PFENet).
        train_augment: augment training images; ``False`` squashes them to ``image_size``
            (HSNet).
        train_ignore: label-255 pixels (PASCAL's object boundaries) in training targets:
            ``ignore``d by the loss, or counted as ``background`` (HSNet).
        backbone_norm: a frozen backbone's BatchNorm in training: ``frozen`` (eval mode) or
            ``batch`` (batch statistics, running statistics updated: PFENet's/ASGNet's
            ``model.train()``); read by the task (:class:`tasks.segment.FewShotSegmentation`).
        loss_reduction: the training cross-entropy averaged per ``episodes`` (each episode's
            labelled pixels, then the episodes) or over the global batch's labelled ``pixels``
            (the papers' ``CrossEntropyLoss(ignore_index=255)``); read by the task.
        base_learner_dropout: a frozen base learner's dropout active in training (BAM's
            ``model.train()`` + ``fix_bn``); read by the task for a head with one.
        min_pixels: pixels a class needs in an image to be used there (OSLSM: 2 * 32 * 32).
        val_fraction: share of each class's training images held out for validation.
        cache_dir: where the class index is cached; ``None`` = :meth:`default_cache_dir`.
        augment_on: where training crops are rendered: ``cpu`` (loader workers) or ``gpu``
            (loaders decode and draw; the model's device warps and blurs the batch in one
            batched ``grid_sample``, :func:`datamodules.transforms.render_on_device`), for nodes
            with few cores per GPU. The same draws either way (tested).
        predict_support: ``predict`` only: support image files (the K shots).
        predict_support_masks: ``predict`` only: one mask PNG per support image.
        predict_queries: ``predict`` only: query image files or folders of images.
    """

    #: the values of the options left ``None`` unless the dataset sets its own (PASCAL-5i's
    #: recipe: PFENet/ASGNet)
    DEFAULTS: ClassVar[dict[str, int | None]] = {
        "image_size": 473,
        "batch_size": 4,
        "num_workers": 4,
        "train_episodes": None,
        "val_episodes": 1000,
        "min_pixels": 2 * 32 * 32,
    }

    def __init__(
        self,
        dataset: SegmentationDataset,
        fold: int = 0,
        shots: PositiveInt = 1,
        image_size: AtLeast8 | None = None,
        batch_size: PositiveInt | None = None,
        global_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt | None = None,
        train_episodes: PositiveInt | None = None,
        val_episodes: PositiveInt | None = None,
        seed: int = 321,
        protocol: ProtocolName | None = None,
        test_episodes: PositiveInt | None = None,
        extra_test_episode: bool | None = None,
        max_test_passes: PositiveInt | None = None,
        test_seeds: PositiveInt | list[int] | None = None,
        test_sampling: TestSampling | None = None,
        query_classes: QueryClasses | None = None,
        support_repeats: bool | None = None,
        eval_resize: EvalResize | None = None,
        eval_size: AtLeast8 | None = None,
        eval_pad: EvalPad | None = None,
        scoring: Scoring | None = None,
        train_sampling: TrainSampling | None = None,
        exclude_novel_from_train: bool | None = None,
        train_scale: tuple[float, float] | None = None,
        rotate_p: Probability | None = None,
        train_resize_longer: bool | None = None,
        train_augment: bool | None = None,
        train_ignore: TrainIgnore | None = None,
        backbone_norm: BackboneNorm | None = None,
        loss_reduction: LossReduction | None = None,
        base_learner_dropout: bool | None = None,
        min_pixels: PositiveInt | None = None,
        val_fraction: OpenFraction = 0.1,
        cache_dir: str | None = None,
        augment_on: AugmentOn = "cpu",
        predict_support: list[str] | None = None,
        predict_support_masks: list[str] | None = None,
        predict_queries: list[str] | None = None,
    ) -> None:
        arguments = dict(locals())
        check_bounds(FewShotDataModule.__init__, arguments)
        super().__init__()
        default = dataset.task_defaults("few_shot", self.DEFAULTS)
        image_size = default["image_size"] if image_size is None else image_size
        batch_size = default["batch_size"] if batch_size is None else batch_size
        num_workers = default["num_workers"] if num_workers is None else num_workers
        train_episodes = default["train_episodes"] if train_episodes is None else train_episodes
        val_episodes = default["val_episodes"] if val_episodes is None else val_episodes
        min_pixels = default["min_pixels"] if min_pixels is None else min_pixels
        folds = range(dataset.num_folds)
        require("fold", fold, fold in folds, f"one of {list(folds)}")
        self.save_hyperparameters(ignore=["dataset"])
        self.hparams["dataset"] = dataset.describe()
        self.dataset = dataset
        self.fold = fold
        self.shots = shots
        self.image_size = image_size
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.train_episodes = train_episodes
        self.val_episodes = val_episodes
        self.seed = seed
        explicit = {name: arguments[name] for name in OPTIONS if name in arguments}
        explicit |= dataset.protocol_options()
        resolved = resolve_protocol(protocol, dataset.protocol_family, explicit, image_size)
        self.protocol = {k: v for k, v in resolved.items() if k not in dataset.protocol_unused}
        dataset.apply_protocol(self.protocol)
        self.min_pixels = min_pixels
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else dataset.default_cache_dir()
        self.novel_classes = dataset.fold_novel_classes(fold)
        self.base_classes = dataset.fold_base_classes(fold)
        classes = len(self.novel_classes)
        if (
            self.protocol["test_sampling"] == "balanced"
            and episodes_per_pass(self.protocol) < classes
        ):
            raise ValueError(
                f"data.test_episodes={self.protocol['test_episodes']}: balanced test sampling "
                f"gives every one of the fold's {classes} classes episodes; expected at least "
                f"{classes}"
            )
        self._pools: dict[str, dict[int, list[str]]] = {}
        self._walks: dict[str, list[tuple[str, tuple[int, ...]]]] = {}

    @property
    def root(self) -> Path:
        return self.dataset.root

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def validation_classes(self) -> list[int]:
        """Classes of the validation episodes: the dataset's validation classes (FSS-1000's
        ``val``), else the base classes."""
        classes = self.dataset.validation_classes(self.fold)
        return self.base_classes if classes is None else classes

    def validation_images(self, counts: ClassCounts) -> set[str]:
        """Training-list images kept out of training for validation episodes: the images of the
        dataset's validation classes, else the stratified hold-out of
        :func:`datamodules.splits.hold_out`."""
        classes = self.dataset.validation_classes(self.fold)
        if classes is None:
            return hold_out(counts, self.val_fraction, self.min_pixels)
        held = set(classes)
        return {image_id for image_id, found in counts.items() if not held.isdisjoint(found)}

    def source(self, split: Split) -> SegmentationSource:
        return self.dataset.source(split)

    def counts(self, split: Split) -> ClassCounts:
        """Class pixel counts of every image of ``split`` (cached on disk)."""
        return class_counts(self.source(split), self.cache_dir)

    def prepare_data(self) -> None:
        """Write a generated dataset, then build (or check) both class index caches once, on one
        process per node."""
        self.dataset.prepare()
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
            self.set_accumulation()
        if stage in (None, "fit", "validate") and "val" not in self._pools:
            counts = self.counts("train")
            held = self.validation_images(counts)
            train_ids = [image_id for image_id in counts if image_id not in held]
            excluded = self.novel_classes if self.protocol["exclude_novel_from_train"] else ()
            self._pools["train"] = self._checked(
                "train",
                eligible_images(counts, train_ids, self.base_classes, self.min_pixels, excluded),
            )
            self._walks["train"] = self._walk(counts, train_ids, self.base_classes, excluded)
            self._pools["val"] = self._checked(
                "val", eligible_images(counts, held, self.validation_classes(), self.min_pixels)
            )
        if stage in (None, "test") and "test" not in self._pools:
            counts = self.counts("test")
            self._pools["test"] = self._checked(
                "test", eligible_images(counts, counts, self.novel_classes, self.min_pixels)
            )
            self._walks["test"] = self._walk(counts, list(counts), self.novel_classes)

    def _walk(
        self,
        counts: ClassCounts,
        image_ids: list[str],
        classes: list[int],
        excluded: Sequence[int] = (),
    ) -> list[tuple[str, tuple[int, ...]]]:
        present = self.protocol["query_classes"] == "present"
        return walk_items(counts, image_ids, classes, self.min_pixels, present, excluded)

    def episode_rule(self, stage: str) -> EpisodeRule:
        """How ``stage`` draws its episodes under the protocol (after setup)."""
        pools = self.pools(stage)
        repeats = self.protocol["support_repeats"]
        if stage == "val":  # this project's own validation: every base class, equal shares
            return EpisodeRule("balanced", pools, self.shots)
        if stage == "train":
            if self.protocol["train_sampling"] == "pairs":
                return EpisodeRule("pairs", pools, self.shots)
            walk = self._walks["train"]
            return EpisodeRule("image_passes", pools, self.shots, walk, repeats)
        rule = self.protocol["test_sampling"]
        walk = self._walks["test"]
        if rule == "pair_walk":
            walk = pair_items(walk)
        return EpisodeRule(rule, pools, self.shots, walk, repeats)

    def _checked(self, stage: str, pools: dict[int, list[str]]) -> dict[int, list[str]]:
        short = {c: len(ids) for c, ids in pools.items() if len(ids) < self.shots + 1}
        if short:
            details = ", ".join(
                f"{self.class_names[c]!r} (class {c}): {n}" for c, n in short.items()
            )
            held = ""
            if stage == "train" and self.dataset.validation_classes(self.fold) is None:
                held = (f" (data.val_fraction={self.val_fraction} of each class's images is held "
                        "out for validation)")  # fmt: skip
            raise ValueError(
                f"{type(self.dataset).__name__} fold {self.fold}, {stage} split: {self.shots}-shot "
                f"episodes need at least {self.shots + 1} images per class with "
                f">= {self.min_pixels} pixels of it; too few for {details}{held}"
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
        draw = self.episode_rule(stage).draw
        if stage == "train":
            seed = torch.initial_seed()  # set by Lightning's seed_everything
            if self.trainer is not None:
                seed = self.trainer.strategy.broadcast(seed, src=0)
            count = self.train_episodes or self.train_epoch_length()
            batch, accumulate = self.train_batches()
            return EpisodeSampler(
                pools, count, self.shots, (seed,), rank, world_size, True, batch * accumulate, draw
            )
        if stage == "val":
            count, seed = self.val_episodes, self.seed
        else:
            count = self.test_episode_count()
            seed = self.test_seeds[0] if test_seed is None else test_seed
        codes = (seed, self.fold, self.shots, _STAGE_CODE[stage])
        return EpisodeSampler(pools, count, self.shots, codes, rank, world_size, draw=draw)

    def test_episode_count(self) -> int:
        """Episodes of one test pass (after setup): the protocol's count, capped at
        ``max_test_passes`` passes over a walked list."""
        count = episodes_per_pass(self.protocol)
        passes = self.protocol["max_test_passes"]
        if passes is not None and self.protocol["test_sampling"] in ("image_walk", "pair_walk"):
            count = min(count, passes * len(self.episode_rule("test").walk))
        return count

    def train_epoch_length(self) -> int:
        """Episodes of a training epoch when ``train_episodes`` is ``None``: one per (image,
        class) pair, or one per listed image under ``train_sampling: images`` (PFENet's epoch)."""
        if self.protocol["train_sampling"] == "images":
            return len(self._walks["train"])
        return sum(len(ids) for ids in self.pools("train").values())

    def _loader(self, stage: str, test_seed: int | None = None) -> DataLoader:
        p = self.protocol
        keep = p.get("coco_crowd", "ignore") == "ignore"
        if stage == "train":
            transform = train_transform(
                self.image_size,
                tuple(p["train_scale"]),
                p["rotate_p"],
                p["train_resize_longer"],
                p["train_augment"],
                on_device=self.hparams.augment_on == "gpu",
            )
            keep = keep and p["train_ignore"] == "ignore"
            dataset = EpisodeDataset(self.source("train"), transform, keep_ignore=keep)
        elif stage == "val":
            evaluation = Evaluation(self.image_size)
            transform = eval_transform(evaluation.size, evaluation.resize)
            dataset = EpisodeDataset(self.source("train"), transform, evaluation, keep)
        else:
            evaluation = Evaluation(p["eval_size"], p["eval_resize"], p["scoring"], p["eval_pad"])
            transform = eval_transform(evaluation.size, evaluation.resize, evaluation.pad)
            dataset = EpisodeDataset(self.source("test"), transform, evaluation, keep)
        return DataLoader(
            dataset,
            batch_size=self.train_batches()[0] if stage == "train" else self.batch_size,
            sampler=self.sampler(stage, test_seed),
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and stage != "test",
        )

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """On the model's device: ``uint8`` pixels rendered (``augment_on: gpu``) and normalised
        into the model's floating type (float64 under ``precision=64-true``), masks made int64
        (:func:`datamodules.episode.to_model_inputs`), so loader workers do no float work."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        return to_model_inputs(batch, input_dtype(module))

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
