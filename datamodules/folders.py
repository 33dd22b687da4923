"""Datasets of one class per folder: FSS-1000 (Wei et al., CVPR 2020) and your own classes.

Each image belongs to the class of its folder and comes with a binary mask of that class. The
split is over classes, as FSS-1000's: one source holds the images of every class in use, training
episodes draw the base classes' images, test episodes the novel classes', and validation
episodes come from held-out images of the base classes, as for PASCAL-5i
(:mod:`datamodules.datamodule`), or from FSS-1000's ``val`` classes. Samplers, protocols
(``clean`` and ``hsnet``: the ``fss`` column of :mod:`datamodules.protocols`), transforms,
metric, DDP sharding and ``predict`` are those of every :class:`FewShotDataModule`.

Labels follow the source convention (``0`` background, ``c + 1`` class index ``c``), held as
``int32`` for more than 254 classes. Value 255 is the ignore label, so the class index 254 is
reserved (never sampled, named ``RESERVED_NAME``) when a dataset has more than 254 classes:
FSS-1000's 1000 classes take indices ``0..253, 255..1000``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .datamodule import FewShotDataModule
from .dataset import SegmentationDataset, Split, TaskDefaults
from .files import IMAGE_EXTENSIONS, data_dir, visible
from .lists import FSS_SPLITS, shipped
from .source import IGNORE, PngLabelSource, missing_path_error

MASK_FOLDER = "masks"
#: HSNet's FSS-1000 splits, in the order of its class indices (``data/fss.py``)
FSS_SPLIT_NAMES = ("trn", "val", "test")
RESERVED_NAME = "(reserved: label 255 is ignore)"

FOLDER_LAYOUT = f"""\
<root>/<class>/<name>.jpg        an image (any of {", ".join(IMAGE_EXTENSIONS)})
<root>/<class>/<name>.png        its mask beside it (0 background, one other value or colour
                                 the object; grey masks: >= 128, as FSS-1000's)
or, with the masks in a sibling folder (then images may be PNGs too):
<root>/<class>/<name>.<ext>
<root>/<class>/{MASK_FOLDER}/<name>.png
One folder per class; every image needs its mask."""

FSS_LAYOUT = """\
<root>/<class>/<k>.jpg   image k (1..10, 224 x 224)
<root>/<class>/<k>.png   its mask (0 background, 255 the object)
1000 class folders, named as in HSNet's data/splits/fss/{trn,val,test}.txt (the fewshot_data/
folder of the FSS-1000 archive)."""


def class_indices(names: Sequence[str]) -> list[str]:
    """``class_names`` for classes ``names`` in order: index 254 is inserted as a reserved
    name when there are more than 254 classes, since its label value would be 255 (ignore)."""
    names = list(names)
    if len(names) > IGNORE - 1:
        names.insert(IGNORE - 1, RESERVED_NAME)
    return names


def read_binary_mask(path: Path) -> np.ndarray:
    """A mask PNG as ``bool [H, W]``, from its values (a palette PNG's indices, other modes in
    grayscale, as HSNet's ``convert('L')``).

    A mask of 0 and one other value ``k`` (0/1, 0/255, 0/2, one colour on black) is binary, ``k``
    the object. A mask reaching 128 takes HSNet's ``data/fss.py`` rule for FSS-1000's anti-aliased
    masks: the object is ``>= 128``. Several values all below 128 fit neither: an error naming
    them, rather than an empty object (its images would silently leave the episodes)."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.array(image if mode == "P" else image.convert("L"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    top = int(values.max(initial=0))
    if top >= 128:
        return values >= 128
    if not ((values > 0) & (values < top)).any():
        return values > 0
    found = np.unique(values).tolist()
    listed = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
    read_as = "palette indices" if mode == "P" else f"{mode} read as grayscale"
    raise ValueError(
        f"mask {path} has values [{listed}] ({read_as}), several below 128: expected 0 and one "
        "object value (0/1, 0/255, one colour on black), or an object of values >= 128 (FSS-1000)"
    )


def scan_class_folder(folder: Path, layout: str) -> dict[str, tuple[Path, Path]]:
    """Image stem -> ``(image, mask)`` of one class folder (see ``FOLDER_LAYOUT``), sorted by
    stem; an image without its mask, or a folder without images, is an error naming it."""
    if not folder.is_dir():
        raise missing_path_error(folder, "class folder", layout)
    mask_dir = folder / MASK_FOLDER
    files = sorted(
        p
        for p in folder.iterdir()
        if visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    pairs: dict[str, tuple[Path, Path]] = {}
    if mask_dir.is_dir():
        for image in files:
            mask = mask_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise missing_path_error(mask, f"mask of image {image}", layout)
            pairs[image.stem] = (image, mask)
    else:
        masks = {p.stem: p for p in files if p.suffix.lower() == ".png"}
        not_png = {p.stem for p in files if p.suffix.lower() != ".png"}
        for image in files:
            if image.suffix.lower() == ".png" and image.stem in not_png:
                continue  # the mask of a non-PNG image of the same name
            mask = masks.get(image.stem)
            if mask is None or mask == image:
                expected = folder / f"{image.stem}.png"
                if mask == image:  # a PNG with no image of its name: an image or a mask?
                    expected = mask_dir / f"{image.stem}.png"
                raise missing_path_error(expected, f"mask of image {image}", layout)
            pairs[image.stem] = (image, mask)
    if not pairs:
        raise missing_path_error(folder / "<name>.jpg", "images of the class", layout)
    return pairs


class ClassFolderSource(PngLabelSource):
    """Images of several class folders; the label of an image is its binary mask times its
    class index + 1 (``int32`` when the values exceed ``uint8``'s)."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        files: dict[str, tuple[Path, Path]],
        class_of: dict[str, int],
    ) -> None:
        super().__init__(name, num_classes, files)
        self.class_of = class_of
        self.dtype = np.uint8 if num_classes < IGNORE else np.int32

    def _decode_label(self, image_id: str) -> np.ndarray:
        mask = read_binary_mask(self._files[image_id][1])
        return mask.astype(self.dtype) * self.dtype(self.class_of[image_id] + 1)


def read_class_list(path: Path) -> list[str]:
    """Class names, one a line (CRLF or LF; blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path}")
    names = [
        line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()
    ]
    if not names:
        raise ValueError(f"class list {path} is empty")
    return names


class ClassFolderDataset(SegmentationDataset):
    """The shared machinery of :class:`FSS1000Dataset` and :class:`FolderDataset`: subclasses
    set ``class_names`` and ``folders`` (class name -> folder) and choose the fold's novel and
    base classes; one source, of :meth:`classes_in_use`, serves both splits."""

    protocol_family = "fss"
    layout: ClassVar[str] = FOLDER_LAYOUT
    source_prefix: ClassVar[str] = "folder"  # names the index cache files
    #: HSNet's FSS-1000 recipe (400 px, every image usable: ``min_pixels`` 1)
    defaults: ClassVar[TaskDefaults] = {
        "few_shot": {"image_size": 400, "batch_size": 8, "min_pixels": 1},
    }
    folders: dict[str, Path]

    def fold_base_classes(self, fold: int) -> list[int]:
        """Every class but the novel ones and the reserved index."""
        return [c for c in super().fold_base_classes(fold) if self.class_names[c] != RESERVED_NAME]

    def classes_in_use(self) -> list[int]:
        """The classes whose images the source holds: every class but the reserved index."""
        return [c for c, name in enumerate(self.class_names) if name != RESERVED_NAME]

    def make_source(self, split: Split) -> ClassFolderSource:
        return self._all_classes

    @cached_property
    def _all_classes(self) -> ClassFolderSource:
        files: dict[str, tuple[Path, Path]] = {}
        class_of: dict[str, int] = {}
        for cls in self.classes_in_use():
            name = self.class_names[cls]
            for stem, paths in scan_class_folder(self.folders[name], self.layout).items():
                image_id = f"{name}/{stem}"
                files[image_id] = paths
                class_of[image_id] = cls
        return ClassFolderSource(self.source_prefix, self.num_classes, files, class_of)


class FSS1000Dataset(ClassFolderDataset):
    """FSS-1000 under HSNet's class split (``data/splits/fss/{trn,val,test}.txt`` of
    juhongm999/hsnet, shipped in ``datamodules/lists/hsnet/fss/``: 520 / 240 / 240 classes).

    Base classes: ``trn``; novel: ``test``; validation episodes: the ``val`` classes, as HSNet
    selects its checkpoints (never a test class). With ``test_split="val"`` the ``val`` classes
    are the novel ones and validation holds out ``trn`` images as for PASCAL-5i. Class indices
    follow HSNet's (``trn`` sorted, then ``val``, then ``test``), with index 254 reserved
    (module docstring). There is one fold.

    Args:
        root: the folder of the 1000 class folders (``FSS_LAYOUT``); ``None``:
            ``data_dir()/FSS-1000``.
        test_split: the novel classes: HSNet's ``test`` or ``val`` split.
        splits_dir: folder holding ``trn.txt``, ``val.txt``, ``test.txt``; ``None``: the shipped
            HSNet lists.
    """

    num_folds = 1
    layout = FSS_LAYOUT
    source_prefix = "fss1000"

    def __init__(
        self,
        root: str | None = None,
        test_split: Literal["test", "val"] = "test",
        splits_dir: str | None = None,
    ) -> None:
        if test_split not in ("test", "val"):
            raise ValueError(f"test_split must be 'test' or 'val', got {test_split!r}")
        super().__init__(root)
        self.test_split = test_split
        lists = Path(splits_dir).expanduser() if splits_dir else shipped(FSS_SPLITS)
        self.splits = {s: sorted(read_class_list(lists / f"{s}.txt")) for s in FSS_SPLIT_NAMES}
        ordered = [name for s in FSS_SPLIT_NAMES for name in self.splits[s]]
        self.class_names = class_indices(ordered)
        self.folders = {name: self.root / name for name in ordered}

    def default_root(self) -> Path:
        return data_dir() / "FSS-1000"

    def fold_novel_classes(self, fold: int) -> list[int]:
        return self._indices(self.test_split)

    def fold_base_classes(self, fold: int) -> list[int]:
        return self._indices("trn")

    def validation_classes(self, fold: int) -> list[int] | None:
        """The ``val`` classes (HSNet's validation split), unless they are the test."""
        return self._indices("val") if self.test_split == "test" else None

    def _indices(self, split: str) -> list[int]:
        names = set(self.splits[split])
        return [c for c, name in enumerate(self.class_names) if name in names]

    def make_source(self, split: Split) -> ClassFolderSource:
        if not self.root.is_dir():
            raise missing_path_error(self.root, "dataset root", self.layout)
        return super().make_source(split)


class FolderDataset(ClassFolderDataset):
    """Your own classes: one folder per class under ``root`` (``FOLDER_LAYOUT``).

    The class split is given as lists (``test_classes``, optionally ``train_classes``: one fold)
    or by a fold count: the classes sorted by name, fold ``i`` of ``folds`` taking the ``i``-th
    contiguous share as novel classes (as PASCAL-5i's ``5i+1 .. 5i+5``).

    Args:
        root: the folder of the class folders.
        test_classes: the novel classes' folder names, or a file listing them (one a line,
            relative to ``root`` or absolute); ``None``: by ``folds``.
        train_classes: the base classes, likewise; ``None``: every other class.
        folds: number of folds when ``test_classes`` is ``None``.
    """

    def __init__(
        self,
        root: str | None = None,
        test_classes: list[str] | str | None = None,
        train_classes: list[str] | str | None = None,
        folds: int = 4,
    ) -> None:
        super().__init__(root)
        folder = self.root
        if not folder.is_dir():
            raise missing_path_error(folder, "dataset root", FOLDER_LAYOUT)
        found = sorted(p.name for p in folder.iterdir() if visible(p) and p.is_dir())
        if not found:
            raise missing_path_error(folder / "<class>", "class folders", FOLDER_LAYOUT)
        if len(found) < 2:
            raise ValueError(
                f"{folder} holds one class folder ({found[0]!r}); few-shot episodes need at least "
                f"2 classes, one to train on and one to test on\nExpected layout:\n{FOLDER_LAYOUT}"
            )
        self.test_class_names = self._names(folder, test_classes, found, "test_classes")
        self.train_class_names = self._names(folder, train_classes, found, "train_classes")
        if self.test_class_names is None:
            if not 2 <= folds <= len(found):
                raise ValueError(
                    f"folds must be in 2..{len(found)} (the number of class folders in "
                    f"{folder}), got {folds}"
                )
            self.num_folds = folds
        else:
            self.num_folds = 1
            both = set(self.test_class_names) & set(self.train_class_names or ())
            if both:
                raise ValueError(
                    f"classes {sorted(both)} are in both test_classes and train_classes"
                )
        self.folds = folds
        self.class_names = class_indices(found)
        self.folders = {name: self.root / name for name in found}

    @staticmethod
    def _names(
        root: Path, given: list[str] | str | None, found: list[str], option: str
    ) -> list[str] | None:
        if given is None:
            return None
        if isinstance(given, str):
            path = Path(given).expanduser()
            given = read_class_list(path if path.is_absolute() else root / path)
        unknown = [name for name in given if name not in found]
        if unknown:
            raise ValueError(
                f"data.{option}: {unknown} are not class folders of {root} (found {found})"
            )
        if not given:
            raise ValueError(f"data.{option} is empty")
        return list(given)

    def default_root(self) -> Path:
        return data_dir() / "folders"

    def fold_novel_classes(self, fold: int) -> list[int]:
        names = [n for n in self.class_names if n != RESERVED_NAME]
        if self.test_class_names is not None:
            novel = set(self.test_class_names)
        else:
            novel = set(np.array_split(np.array(names), self.num_folds)[fold].tolist())
        return [c for c, name in enumerate(self.class_names) if name in novel]

    def fold_base_classes(self, fold: int) -> list[int]:
        if self.train_class_names is None:
            return super().fold_base_classes(fold)
        base = set(self.train_class_names)
        return [c for c, name in enumerate(self.class_names) if name in base]

    def classes_in_use(self) -> list[int]:
        """Every class, or those of ``train_classes`` and ``test_classes`` when both are given."""
        if self.test_class_names is None or self.train_class_names is None:
            return super().classes_in_use()
        used = set(self.test_class_names) | set(self.train_class_names)
        return [c for c, name in enumerate(self.class_names) if name in used]


class FSS1000(FewShotDataModule):
    """FSS-1000 episodes: :class:`FewShotDataModule` of an :class:`FSS1000Dataset`, under the
    class path configs and checkpoints record.

    Args:
        root: see :class:`FSS1000Dataset`.
        test_split: see :class:`FSS1000Dataset`.
        splits_dir: see :class:`FSS1000Dataset`.
        **kwargs: see :class:`FewShotDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = FSS1000Dataset

    def __init__(
        self,
        root: str | None = None,
        test_split: Literal["test", "val"] = "test",
        splits_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, test_split, splits_dir), **kwargs)


class FolderFewShot(FewShotDataModule):
    """Episodes of your own class folders: :class:`FewShotDataModule` of a
    :class:`FolderDataset`.

    Args:
        root: see :class:`FolderDataset`.
        test_classes: see :class:`FolderDataset`.
        train_classes: see :class:`FolderDataset`.
        folds: see :class:`FolderDataset`.
        **kwargs: see :class:`FewShotDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = FolderDataset

    def __init__(
        self,
        root: str | None = None,
        test_classes: list[str] | str | None = None,
        train_classes: list[str] | str | None = None,
        folds: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, test_classes, train_classes, folds), **kwargs)
