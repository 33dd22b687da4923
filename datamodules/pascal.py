"""PASCAL-5i (Shaban et al., OSLSM) from a VOC2012 root with SBD-augmented labels."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datamodule import FewShotDataModule
from .dataset import SegmentationDataset, Split
from .files import IMAGE_EXTENSIONS, data_dir
from .lists import NODUPLICATE, shipped
from .protocols import NODUPLICATE_LIST, TRAIN_AUG_LIST
from .source import PngLabelSource, missing_path_error
from .splits import pascal_novel_classes

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

#: VOC2012 val, the PASCAL-5i test list
VAL_LIST = "ImageSets/Segmentation/val.txt"
#: SBD-augmented single-channel labels
LABEL_DIR = "SegmentationClassAug"

PASCAL_LAYOUT = """\
<root>/
  JPEGImages/<id>.jpg
  SegmentationClassAug/<id>.png   single-channel labels: 0 background, 1..20 classes, 255 ignore
  ImageSets/SegmentationAug/train_aug.txt   training list (SBD-augmented train, 10582 images)
  lists/pascal/voc_sbd_merge_noduplicate.txt  training list of the pfenet/asgnet/bam presets
                                            (5953 images; from PFENet's repository; when the
                                            tree lacks it, the copy shipped in datamodules/lists)
  ImageSets/Segmentation/val.txt            test list (VOC2012 val, 1449 images)
List lines are ids ("2007_000032") or an image path and a .png label path separated by
whitespace ("JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png", as PFENet's
lists), relative to <root> (a leading "/" too) unless absolute and existing; ids and paths may
hold spaces."""

#: A list line of two paths, told apart by their suffixes so that either may hold spaces.
PATH_PAIR = re.compile(
    rf"(?P<image>.+?(?:{'|'.join(map(re.escape, IMAGE_EXTENSIONS))}))\s+(?P<label>.+\.png)",
    re.IGNORECASE,
)


@functools.cache
def voc_palette() -> tuple[int, ...]:
    """The VOC colour map (256 RGB entries, flattened), used to write palette PNG labels."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [red, green, blue]
    return tuple(palette)


def save_label_png(label: np.ndarray, path: Path) -> None:
    """Write a ``uint8 [H, W]`` label map as a VOC palette PNG (as VOC's SegmentationClass)."""
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label))
    image.putpalette(voc_palette())
    image.save(path)


def pascal_source(
    root: Path,
    list_file: str,
    name: str,
    image_dir: str = "JPEGImages",
    label_dir: str = LABEL_DIR,
    num_classes: int = 20,
) -> PngLabelSource:
    """A split of a VOC-layout tree, read from its list file (see ``PASCAL_LAYOUT``)."""
    if not root.is_dir():
        raise missing_path_error(root, "dataset root", PASCAL_LAYOUT)
    for folder in (image_dir, label_dir):
        if not (root / folder).is_dir():
            raise missing_path_error(root / folder, "folder", PASCAL_LAYOUT)
    list_path = root / list_file
    if not list_path.is_file() and list_file == NODUPLICATE_LIST:
        list_path = shipped(NODUPLICATE)  # PFENet's list, shipped: a tree need not hold it
    if not list_path.is_file():
        raise missing_path_error(list_path, "list file", PASCAL_LAYOUT)
    files: dict[str, tuple[Path, Path]] = {}
    for number, line in enumerate(list_path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        entry = list_entry(root, line.strip(), image_dir, label_dir)
        if entry is None:
            raise ValueError(
                f"{list_path}:{number}: a list line holds an image id (of an image "
                f"{image_dir}/<id>.jpg under {root}) or an image path and a .png label path "
                f"separated by whitespace, got {line!r}"
            )
        files.setdefault(*entry)  # PFENet's merged lists hold duplicates
    if not files:
        raise ValueError(f"list file {list_path} is empty")
    return PngLabelSource(name, num_classes, files)


def list_entry(
    root: Path, line: str, image_dir: str, label_dir: str
) -> tuple[str, tuple[Path, Path]] | None:
    """Image id and (image, label) paths of a list line; ``None`` for a line with whitespace that
    is neither a path pair nor the id of an existing image. A one-word id is taken as it is, so
    that a missing file is reported by name when the source is indexed."""
    pair = PATH_PAIR.fullmatch(line)
    if pair:
        image, label = listed_path(root, pair["image"]), listed_path(root, pair["label"])
        return image.stem, (image, label)
    image = root / image_dir / f"{line}.jpg"
    if len(line.split()) > 1 and not image.is_file():
        return None
    return line, (image, root / label_dir / f"{line}.png")


def listed_path(root: Path, field: str) -> Path:
    """A path of a list line: an existing absolute path as it is (PFENet joins it with
    ``os.path.join``, where an absolute path wins), otherwise relative to ``root``, a leading "/"
    included (lines such as "/JPEGImages/x.jpg /SegmentationClassAug/x.png")."""
    path = Path(field)
    if path.is_absolute() and path.exists():
        return path
    return root / field.lstrip("/")


class PascalDataset(SegmentationDataset):
    """PASCAL VOC 2012 with SBD-augmented labels (``PASCAL_LAYOUT``): 20 classes, PASCAL-5i's
    folds (fold ``i`` novel classes ``5i+1 .. 5i+5``, OSLSM).

    Args:
        root: the VOC2012 folder; ``None``: ``data_dir()/VOC2012``.
        train_list: training list relative to ``root``; ``None``: few-shot, the protocol's (the
            clean protocol and HSNet: the SBD-augmented ``train_aug.txt``; PFENet, ASGNet, BAM:
            ``lists/pascal/voc_sbd_merge_noduplicate.txt``, 5953 images, from their repositories'
            ``lists/pascal/``; read from ``datamodules/lists/`` when the tree has no copy);
            semantic, ``train_aug.txt`` (10582 images).
        test_list: test list relative to ``root`` (VOC2012 val, 1449 images).
        label_dir: folder of the single-channel label PNGs.
    """

    class_names = VOC_CLASSES
    protocol_unused = ("coco_crowd",)

    def __init__(
        self,
        root: str | None = None,
        train_list: str | None = None,
        test_list: str = VAL_LIST,
        label_dir: str = LABEL_DIR,
    ) -> None:
        super().__init__(root)
        self.train_list, self.label_dir = train_list, label_dir
        self.lists = {"train": train_list or TRAIN_AUG_LIST, "test": test_list}

    def default_root(self) -> Path:
        return data_dir() / "VOC2012"

    def fold_novel_classes(self, fold: int) -> list[int]:
        return pascal_novel_classes(fold)

    def protocol_options(self) -> dict[str, Any]:
        return {"train_list": self.train_list}

    def apply_protocol(self, protocol: Mapping[str, Any]) -> None:
        self.lists["train"] = protocol["train_list"]
        self._sources.clear()

    def make_source(self, split: Split) -> PngLabelSource:
        return pascal_source(
            self.root, self.lists[split], f"pascal-{split}", label_dir=self.label_dir
        )


class PascalFewShot(FewShotDataModule):
    """PASCAL-5i episodes: :class:`FewShotDataModule` of a :class:`PascalDataset`, under the
    class path configs and checkpoints record.

    Args:
        root: see :class:`PascalDataset`.
        train_list: see :class:`PascalDataset`.
        test_list: see :class:`PascalDataset`.
        label_dir: see :class:`PascalDataset`.
        **kwargs: see :class:`FewShotDataModule`.
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
