"""Semantic segmentation data: every image labelled with all its classes, for base learners.

:class:`SemanticDataModule` trains on any :class:`~datamodules.dataset.SegmentationDataset`; the
named datamodules bind the shipped ones under the class paths configs record:

* :class:`PascalSemantic`: VOC 2012 (SegmentationClassAug layout, as :mod:`datamodules.pascal`
  reads it): 21 classes with background, or with ``fold=k`` the base classes of PASCAL-5i fold
  ``k`` (16 with background).
* :class:`CocoSemantic`: COCO 2014 (as :mod:`datamodules.coco` reads it): 81 classes, or the 61
  of a COCO-20i fold.
* :class:`ShapesSemantic`: the embedded generated ``shapes`` set (default: fold 0's base classes),
  so a fresh machine trains a base learner with no download.

Base classes of a fold are BAM's base annotations (chunbolang/BAM ``util/dataset.py``
``BaseData.__getitem__``, the same rule as ``util/get_mulway_base_data.py``): base class ``c``
becomes its rank among the sorted base classes plus one (``sub_list.index(c) + 1``), every novel
class background 0, and 255 stays 255 (the loop runs over the classes only). BAM's base learner
(``train_base.py`` with ``BaseData``) trains on the whole training list, novel objects relabelled
background; ``exclude_novel_from_train`` applies BAM's meta-training filter (``make_dataset``'s
``filter_intersection``: drop every image with a pixel of a novel class) instead.

Batches use the episode batch's query fields (:mod:`datamodules.episode`), so conversion on the
device (:func:`~datamodules.episode.to_model_inputs`) and scoring at the original resolution are
shared with few-shot segmentation: ``query_image`` uint8 ``[B, 3, S, S]``, ``query_mask`` uint8
``[B, S, S]`` (class indices, 255 ignored); evaluation adds ``query_label`` (at the original
resolution, padded with 255), ``query_size``, ``query_valid``, ``query_resize_to`` and
``query_id``. Images are sharded over DDP ranks by :class:`~datamodules.sampler.EpisodeSampler`
(one-image "episodes"): training takes each global batch's images in contiguous blocks per rank,
each with its own augmentation seed, evaluation every image exactly once.
"""

# No ``from __future__ import annotations``: the ranges must reach jsonargparse
# (datamodules.bounds).

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .bounds import (
    AtLeast8,
    NonNegativeInt,
    OpenFraction,
    PositiveInt,
    Probability,
    check_bounds,
    require,
)
from .coco import CocoDataset
from .dataset import SegmentationDataset
from .episode import (
    Batch,
    Episode,
    Evaluation,
    JointTransform,
    collate_episodes,
    image_tensor,
    input_dtype,
    to_model_inputs,
)
from .global_batch import GlobalBatchDataModule
from .index import class_counts
from .pascal import LABEL_DIR, VAL_LIST, PascalDataset
from .predict import expand_images
from .protocols import EvalPad, EvalResize, Scoring
from .sampler import EpisodeSampler, rank_and_world_size
from .shapes import ShapesDataset
from .source import IGNORE, SegmentationSource, open_image
from .splits import CocoSplit, hold_out
from .transforms import eval_transform, train_transform

BACKGROUND = "background"


def relabel_table(
    num_source_classes: int, kept: Sequence[int], ignored: int = IGNORE
) -> np.ndarray:
    """A ``uint8 [256]`` lookup from source labels (0 background, ``c + 1`` class ``c``, 255
    ignore) to the kept classes ``1..len(kept)`` in the order given; every other class 0,
    255 to ``ignored`` (BAM ``BaseData``: ``sub_list.index(cls) + 1``, others 0, 255 kept)."""
    if len(kept) > 254:
        raise ValueError(f"{len(kept)} classes do not fit uint8 labels with 255 ignored")
    table = np.zeros(256, dtype=np.uint8)
    table[IGNORE] = ignored
    for index, cls in enumerate(kept, start=1):
        if not 0 <= cls < num_source_classes:
            raise ValueError(f"class {cls} is not in 0..{num_source_classes - 1}")
        table[cls + 1] = index
    return table


class SemanticImages(Dataset):
    """Images of a source with their relabelled class maps, indexed by one-image
    :class:`~datamodules.episode.Episode` (``query`` the image id, ``seed`` its augmentation).

    Args:
        source: where images and labels come from.
        table: the :func:`relabel_table` applied to every label.
        transform: joint transform (:mod:`datamodules.transforms`).
        evaluation: add the scoring label and its geometry (``None`` in training).
    """

    def __init__(
        self,
        source: SegmentationSource,
        table: np.ndarray,
        transform: JointTransform,
        evaluation: Evaluation | None = None,
    ) -> None:
        self.source, self.table = source, table
        self.transform, self.evaluation = transform, evaluation

    def __getitem__(self, item: Episode) -> Batch:  # type: ignore[override]
        image, label = self.source.read(item.query)
        label = self.table[label]
        pixels, mask = self.transform(image, label, np.random.default_rng(item.seed))
        batch: Batch = {"query_image": image_tensor(pixels), "query_mask": torch.from_numpy(mask)}
        if self.evaluation is not None:
            batch.update(self.evaluation.label_fields(label, batch["query_mask"]))
            batch["query_id"] = item.query
        return batch


class PredictImages(Dataset):
    """``predict`` inputs: image files or folders, with the evaluation geometry and path."""

    def __init__(self, paths: Sequence[str], transform: JointTransform, evaluation: Evaluation):
        self.queries = expand_images(paths)
        if not self.queries:
            raise ValueError("predict needs images (data.predict_images)")
        self.transform, self.evaluation = transform, evaluation

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> Batch:
        path = self.queries[index]
        image = open_image(path)
        blank = np.zeros(image.shape[:2], dtype=np.uint8)
        pixels, mask = self.transform(image, blank, None)
        batch = {"query_image": image_tensor(pixels)}
        batch.update(self.evaluation.label_fields(blank, torch.from_numpy(mask)))
        del batch["query_label"]
        return {**batch, "query_id": path.stem, "query_path": str(path)}


class SemanticDataModule(GlobalBatchDataModule):
    """Semantic segmentation of a dataset's classes, or of a fold's base classes.

    Stages: ``fit`` trains on the training list (minus the held-out images and, with
    ``exclude_novel_from_train``, minus every image showing a novel class) and validates on the
    held-out images (a stratified ``val_fraction`` of the training list,
    :func:`datamodules.splits.hold_out`; ``None``: on the test list, as BAM's ``train_base.py``
    selects its ``best.pth``); ``test`` scores the test list. Class 0 is background.

    Options that default to ``None`` take the dataset's own value (:data:`DEFAULTS`, then the
    dataset's ``defaults["semantic"]``).

    Args:
        dataset: the data (:class:`datamodules.dataset.SegmentationDataset`); COCO's
            ``coco_crowd: background`` makes crowd pixels background here too.
        fold: ``None``: every class of the dataset; ``k``: the base classes of fold ``k``, novel
            classes relabelled background (BAM's base annotations).
        exclude_novel_from_train: drop training images holding any pixel of a novel class
            (BAM's ``filter_intersection``); BAM's base learner keeps them (``BaseData``).
        image_size: the square training crop (BAM: 417).
        eval_size: evaluation canvas; ``None``: the dataset's default or ``image_size``.
        eval_resize: ``longer_pad`` (this project), ``floor8`` (BAM/PFENet ``Resize``) or
            ``squash`` (:mod:`datamodules.transforms`).
        eval_pad: ``mean`` or ``black`` (BAM) padding of the evaluation canvas.
        scoring: ``original`` (crop the padding, resize to the label), ``square`` (PFENet's
            ``ori_resize``) or ``input`` (at the canvas against the resized label: BAM's base
            validation, ``ori_resize: False``).
        train_scale: random scale range; ``None``: the dataset's (PSPNet/BAM base learner:
            0.5-2.0).
        rotate_p: probability of the +-10 degree rotation (BAM's ``RandRotate``: 0.5).
        train_resize_longer: resize the longer side to ``image_size`` before augmenting; BAM
            augments at the native resolution (``False``).
        batch_size: images per device batch (with ``global_batch_size``: at most).
        global_batch_size: images per optimizer step over all devices (BAM: 12, 4 GPUs x 3);
            the accumulation follows (:func:`datamodules.sampler.step_batches`).
        num_workers: loader worker processes.
        val_fraction: share of the training list held out for validation; ``None``: validate
            on the test list.
        cache_dir: class index cache (:mod:`datamodules.index`); ``None``: the default.
        predict_images: ``predict`` only: image files or folders.
    """

    #: the values of the options left ``None`` unless the dataset sets its own (BAM's base
    #: learner; a config that switches datasets so never inherits another dataset's sizes)
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "image_size": 417,
        "eval_size": None,
        "train_scale": (0.5, 2.0),
        "batch_size": 4,
        "num_workers": 4,
    }

    def __init__(
        self,
        dataset: SegmentationDataset,
        fold: int | None = None,
        exclude_novel_from_train: bool = False,
        image_size: AtLeast8 | None = None,
        eval_size: AtLeast8 | None = None,
        eval_resize: EvalResize = "longer_pad",
        eval_pad: EvalPad = "mean",
        scoring: Scoring = "original",
        train_scale: tuple[float, float] | None = None,
        rotate_p: Probability = 0.5,
        train_resize_longer: bool = False,
        batch_size: PositiveInt | None = None,
        global_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt | None = None,
        val_fraction: OpenFraction | None = 0.05,
        cache_dir: str | None = None,
        predict_images: list[str] | None = None,
    ) -> None:
        check_bounds(SemanticDataModule.__init__, dict(locals()))
        super().__init__()
        default = dataset.task_defaults("semantic", self.DEFAULTS)
        image_size = default["image_size"] if image_size is None else image_size
        eval_size = default["eval_size"] if eval_size is None else eval_size
        train_scale = default["train_scale"] if train_scale is None else tuple(train_scale)
        batch_size = default["batch_size"] if batch_size is None else batch_size
        num_workers = default["num_workers"] if num_workers is None else num_workers
        low, high = train_scale
        folds = range(dataset.num_folds)
        require("fold", fold, fold is None or fold in folds, f"None or one of {list(folds)}")
        require("train_scale", train_scale, 0 < low <= high, "(low, high) with 0 < low <= high")
        self.save_hyperparameters(ignore=["dataset"])
        self.hparams["dataset"] = dataset.describe()
        self.dataset = dataset
        self.fold = fold
        self.exclude_novel_from_train = exclude_novel_from_train
        self.image_size, self.train_scale = image_size, train_scale
        self.evaluation = Evaluation(eval_size or image_size, eval_resize, scoring, eval_pad)
        self.batch_size, self.global_batch_size = batch_size, global_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else dataset.default_cache_dir()
        self.novel_classes = [] if fold is None else dataset.fold_novel_classes(fold)
        self.kept_classes = [c for c in range(dataset.num_classes) if c not in self.novel_classes]
        self.class_names = [BACKGROUND, *(dataset.class_names[c] for c in self.kept_classes)]
        self.num_classes = len(self.class_names)
        crowd = dataset.protocol_options().get("coco_crowd")
        ignored = 0 if crowd == "background" else IGNORE
        self.table = relabel_table(dataset.num_classes, self.kept_classes, ignored)
        self._ids: dict[str, list[str]] = {}

    @property
    def root(self) -> Path:
        return self.dataset.root

    def source(self, split: str) -> SegmentationSource:
        return self.dataset.source(split)

    def prepare_data(self) -> None:
        """A generated dataset written, then the training list's class index, built once
        (held-out split, novel filter)."""
        self.dataset.prepare()
        if self.val_fraction is not None or self.exclude_novel_from_train:
            class_counts(self.source("train"), self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return
        if stage == "fit":
            self.set_accumulation()
        if stage in (None, "fit", "validate") and "train" not in self._ids:
            self._split_training_list()
        if stage in (None, "test") and "test" not in self._ids:
            self._ids["test"] = self.source("test").ids
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"semantic_data": self.summary()})

    def _split_training_list(self) -> None:
        source = self.source("train")
        needs_counts = self.val_fraction is not None or self.exclude_novel_from_train
        counts = class_counts(source, self.cache_dir) if needs_counts else {}
        held = hold_out(counts, self.val_fraction, 1) if self.val_fraction is not None else set()
        novel = set(self.novel_classes) if self.exclude_novel_from_train else set()
        kept = [i for i in source.ids if i not in held]
        self._ids["train"] = [i for i in kept if not novel.intersection(counts[i])]
        self.excluded_train_images = len(kept) - len(self._ids["train"])
        self._ids["val"] = [i for i in source.ids if i in held]
        if self.val_fraction is None:
            self._ids["val"] = self.source("test").ids
        if not self._ids["train"] or not self._ids["val"]:
            raise ValueError(
                f"{type(self).__name__}: {len(self._ids['train'])} training and "
                f"{len(self._ids['val'])} validation images; expected some of each (a larger "
                "training list, or another val_fraction)"
            )

    def ids(self, stage: str) -> list[str]:
        """Image ids of ``stage`` (``train``, ``val``, ``test``), after setup."""
        if stage not in self._ids:
            raise RuntimeError(f"call setup() before asking for the {stage!r} images")
        return self._ids[stage]

    def summary(self) -> dict[str, Any]:
        """What the run trains and scores on (the W&B run's config)."""
        return {
            "dataset": type(self.dataset).__name__,
            "fold": self.fold,
            "classes": self.num_classes,
            "novel_classes": [self.dataset.class_names[c] for c in self.novel_classes],
            "exclude_novel_from_train": self.exclude_novel_from_train,
            "images": {stage: len(ids) for stage, ids in self._ids.items()},
            "excluded_train_images": getattr(self, "excluded_train_images", None),
        }

    # --- loaders -----------------------------------------------------------------------------

    def sampler(self, stage: str) -> EpisodeSampler:
        """This process's share of ``stage``'s images: training in a new order every epoch
        (one pass, cut to whole optimizer steps), evaluation each image once."""
        ids = self.ids(stage)
        rank, world_size = rank_and_world_size(self.trainer)
        if stage != "train":
            listed = [Episode(image_id, 0, ()) for image_id in ids]
            return EpisodeSampler(
                {}, len(ids), 0, (0,), rank, world_size, draw=lambda count, seed: listed
            )
        seed = torch.initial_seed()  # set by Lightning's seed_everything
        if self.trainer is not None:
            seed = self.trainer.strategy.broadcast(seed, src=0)
        batch, accumulate = self.train_batches()

        def draw(count: int, seed: Sequence[int]) -> list[Episode]:
            order = np.random.default_rng(list(seed)).permutation(len(ids))[:count]
            return [Episode(ids[i], 0, ()) for i in order]

        return EpisodeSampler(
            {}, len(ids), 0, (seed,), rank, world_size, True, batch * accumulate, draw
        )

    def _loader(self, stage: str) -> DataLoader:
        if stage == "train":
            transform = train_transform(
                self.image_size,
                self.train_scale,
                self.hparams.rotate_p,
                self.hparams.train_resize_longer,
            )
            dataset = SemanticImages(self.source("train"), self.table, transform)
        else:
            e = self.evaluation
            held_out = stage == "val" and self.val_fraction is not None
            source = self.source("train" if held_out else "test")
            transform = eval_transform(e.size, e.resize, e.pad)
            dataset = SemanticImages(source, self.table, transform, e)
        return DataLoader(
            dataset,
            batch_size=self.train_batches()[0] if stage == "train" else self.batch_size,
            sampler=self.sampler(stage),
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and stage != "test",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        e = self.evaluation
        dataset = PredictImages(
            self.hparams.predict_images or [], eval_transform(e.size, e.resize, e.pad), e
        )
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=collate_episodes)  # fmt: skip

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """``uint8`` pixels normalised in the model's floating type on its device, labels int64
        (:func:`datamodules.episode.to_model_inputs`)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        return to_model_inputs(batch, input_dtype(module))


class PascalSemantic(SemanticDataModule):
    """VOC 2012 semantic segmentation: :class:`SemanticDataModule` of a
    :class:`~datamodules.pascal.PascalDataset` (21 classes, or the 16 of PASCAL-5i fold ``k``'s
    base classes with ``fold=k``), under the class path configs record.

    Args:
        root: see :class:`~datamodules.pascal.PascalDataset`.
        train_list: ``None``: ``train_aug.txt``; BAM's base learner:
            ``lists/pascal/voc_sbd_merge_noduplicate.txt``
            (:class:`~datamodules.pascal.PascalDataset`).
        test_list: see :class:`~datamodules.pascal.PascalDataset`.
        label_dir: see :class:`~datamodules.pascal.PascalDataset`.
        **kwargs: see :class:`SemanticDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = PascalDataset

    def __init__(
        self,
        root: str | None = None,
        train_list: str | None = None,
        test_list: str = VAL_LIST,
        label_dir: str = LABEL_DIR,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, train_list, test_list, label_dir), **kwargs)


class CocoSemantic(SemanticDataModule):
    """COCO 2014 semantic segmentation: :class:`SemanticDataModule` of a
    :class:`~datamodules.coco.CocoDataset` (81 classes, or the 61 of COCO-20i fold ``k``'s base
    classes), under the class path configs record.

    Args:
        root: see :class:`~datamodules.coco.CocoDataset`.
        split: see :class:`~datamodules.coco.CocoDataset`.
        masks: see :class:`~datamodules.coco.CocoDataset`.
        masks_partial: see :class:`~datamodules.coco.CocoDataset`.
        **kwargs: see :class:`SemanticDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = CocoDataset

    def __init__(
        self,
        root: str | None = None,
        split: CocoSplit = "interleaved",
        masks: str | None = None,
        masks_partial: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, split, masks, masks_partial), **kwargs)


class ShapesSemantic(SemanticDataModule):
    """The generated ``shapes`` set as semantic segmentation: :class:`SemanticDataModule` of a
    :class:`~datamodules.shapes.ShapesDataset` (its sizes), by default fold 0's 15 base classes
    and background.

    Args:
        root: see :class:`~datamodules.shapes.ShapesDataset` (shared with
            :class:`datamodules.ShapesFewShot`: the same images).
        num_train: see :class:`~datamodules.shapes.ShapesDataset`.
        num_test: see :class:`~datamodules.shapes.ShapesDataset`.
        data_seed: see :class:`~datamodules.shapes.ShapesDataset`.
        fold: default 0 (``None``: all 20 classes).
        **kwargs: see :class:`SemanticDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = ShapesDataset

    def __init__(
        self,
        root: str | None = None,
        num_train: int = 2500,
        num_test: int = 500,
        data_seed: int = 0,
        fold: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, num_train, num_test, data_seed), fold, **kwargs)
