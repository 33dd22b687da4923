"""A segmentation dataset, written once for every task.

A :class:`SegmentationDataset` holds what is true of the data whatever is done with it: where it
lives (``root``, lists), its classes, the rule that splits them into folds, its sources (one per
split, :mod:`datamodules.source`) and the option values its recipes use. The few-shot
(:class:`datamodules.FewShotDataModule`) and semantic
(:class:`datamodules.semantic.SemanticDataModule`) datamodules compose one, as torchgeo's
datamodules compose its datasets, so a dataset of one's own is one class that both
``tasks.segment`` and ``tasks.semantic`` run::

    python -m tasks.segment fit --data datamodules.FewShotDataModule --data.dataset my.Leaves
    python -m tasks.semantic fit --data datamodules.semantic.SemanticDataModule \\
        --data.dataset my.Leaves --data.fold 0

The named datamodules (``PascalFewShot``, ``PascalSemantic``, ...) are a dataset bound to a
datamodule under the class paths that configs and checkpoints record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from backbones.arguments import CapturesArguments

from .files import data_dir
from .source import SegmentationSource
from .splits import NUM_FOLDS

Split = Literal["train", "test"]
#: Which datamodule reads :attr:`SegmentationDataset.defaults`.
Task = Literal["few_shot", "semantic"]
#: Per task, option values (:attr:`SegmentationDataset.defaults`).
TaskDefaults = Mapping[Task, Mapping[str, Any]]


class SegmentationDataset(CapturesArguments, ABC):
    """Where a dataset's files are, its classes and their folds.

    Subclasses set :attr:`class_names` (or assign it in ``__init__`` when the classes are read
    from disk) and define :meth:`default_root`, :meth:`fold_novel_classes` and
    :meth:`make_source`; the rest has defaults that suit a VOC-like dataset.

    Args:
        root: dataset root; ``None``: :meth:`default_root`.
    """

    #: the source classes in label order: index ``c`` is label value ``c + 1``
    class_names: list[str]
    #: folds of the class split
    num_folds: int = NUM_FOLDS
    #: which column of a protocol's per-dataset values applies (:mod:`datamodules.protocols`)
    protocol_family: ClassVar[str] = "pascal"
    #: protocol options this dataset has no use for, left out of the resolved protocol
    protocol_unused: ClassVar[tuple[str, ...]] = ("train_list", "coco_crowd")
    #: per task, the values of the datamodule's options left ``None`` (a config that switches
    #: the dataset so never inherits another dataset's sizes)
    defaults: ClassVar[TaskDefaults] = {}
    uncaptured_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else self.default_root()
        self._sources: dict[Split, SegmentationSource] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def default_root(self) -> Path:
        """Root used when ``root`` is ``None``."""

    def default_cache_dir(self) -> Path:
        """Where the class index is cached by default: ``data_dir()/index`` (dataset roots are
        often read-only)."""
        return data_dir() / "index"

    @abstractmethod
    def fold_novel_classes(self, fold: int) -> list[int]:
        """0-based novel classes of ``fold``."""

    def fold_base_classes(self, fold: int) -> list[int]:
        """0-based base (training) classes of ``fold``: by default every other class."""
        novel = set(self.fold_novel_classes(fold))
        return [c for c in range(self.num_classes) if c not in novel]

    def validation_classes(self, fold: int) -> list[int] | None:
        """Classes whose training images are the few-shot validation set (FSS-1000's ``val``
        split); ``None``: validation holds out a share of the base classes' training images."""
        return None

    @abstractmethod
    def make_source(self, split: Split) -> SegmentationSource:
        """The ``train`` or ``test`` split; raises with the expected layout if files are
        missing."""

    def source(self, split: Split) -> SegmentationSource:
        """:meth:`make_source`, built once."""
        if split not in self._sources:
            self._sources[split] = self.make_source(split)
        return self._sources[split]

    def prepare(self) -> None:
        """Write what the dataset generates (the ``shapes`` set); a real dataset has nothing to
        do (``python -m datamodules.prepare`` builds those)."""

    def protocol_options(self) -> dict[str, Any]:
        """Protocol options of this dataset's own (``train_list``, ``coco_crowd``) as given
        (``None``: the preset's)."""
        return {}

    def apply_protocol(self, protocol: Mapping[str, Any]) -> None:
        """Take the resolved few-shot protocol's dataset options (PASCAL: its training list)
        before any source is built."""

    def task_defaults(self, task: Task, generic: Mapping[str, Any]) -> dict[str, Any]:
        """``generic`` (the datamodule's), overridden by this dataset's :attr:`defaults` of
        ``task``."""
        return {**generic, **self.defaults.get(task, {})}

    def describe(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: what rebuilds this dataset (a config's form)."""
        kind = type(self)
        return {"class_path": f"{kind.__module__}.{kind.__qualname__}", "init_args": self.init_args}
