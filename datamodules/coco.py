"""COCO-20i from COCO 2014: instances JSON (via pycocotools) or pre-rendered class masks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pycocotools.coco import COCO

from .datamodule import FewShotDataModule
from .dataset import SegmentationDataset, Split, TaskDefaults
from .files import data_dir, visible
from .protocols import CocoCrowd
from .source import IGNORE, PngLabelSource, SegmentationSource, missing_path_error
from .splits import CocoSplit, coco_novel_classes

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

COCO_LAYOUT = """\
<root>/
  train2014/<file_name>.jpg
  val2014/<file_name>.jpg
  annotations/instances_train2014.json
  annotations/instances_val2014.json
or, with masks="<masks>" (pre-rendered, one single-channel PNG per image: 0 background,
1..80 the categories in category-id order, 255 ignore):
  <masks>/train2014/<image id>.png
  <masks>/val2014/<image id>.png"""


class CocoInstancesSource(SegmentationSource):
    """A COCO split rendered from its instances JSON.

    Polygons, uncompressed and compressed RLE all go through pycocotools' ``annToMask``.
    Non-crowd instances are painted largest first, so small objects stay on top; crowd regions
    not covered by an instance become 255 (ignored). The 80 categories sorted by id give the
    0-based class indices. Workers hold the whole JSON; for the full train set the pre-rendered
    mask layout uses far less memory.
    """

    def __init__(self, name: str, image_dir: Path, annotation_file: Path) -> None:
        super().__init__(name, len(COCO_CLASSES))
        for path, what in ((image_dir, "image folder"), (annotation_file, "annotation file")):
            if not path.exists():
                raise missing_path_error(path, what, COCO_LAYOUT)
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotation_file))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
            raise ValueError(
                f"cannot read COCO annotations {annotation_file}: {error!r}"
            ) from error
        category_ids = sorted(self.coco.getCatIds())
        if len(category_ids) != len(COCO_CLASSES):
            raise ValueError(
                f"{annotation_file} has {len(category_ids)} categories; COCO-20i needs "
                f"{len(COCO_CLASSES)}"
            )
        names = [self.coco.cats[category].get("name") for category in category_ids]
        wrong = [
            f"id {category}: {name!r} (expected {expected!r})"
            for category, name, expected in zip(category_ids, names, COCO_CLASSES, strict=True)
            if name != expected
        ]
        if wrong:
            raise ValueError(
                f"{annotation_file}: categories in id order are not COCO's 80 (the class indices "
                f"and folds would shift): {'; '.join(wrong[:5])}"
                + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            )
        self._class_of = {category: index for index, category in enumerate(category_ids)}
        images = sorted(self.coco.imgs.values(), key=lambda image: image["id"])
        self._images: dict[str, dict[str, Any]] = {Path(i["file_name"]).stem: i for i in images}

    @property
    def ids(self) -> list[str]:
        return list(self._images)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / self._images[image_id]["file_name"]

    def label_origin(self, image_id: str) -> str:
        return f"annotations of {image_id} in {self.annotation_file}"

    def _decode_label(self, image_id: str) -> np.ndarray:
        info = self._images[image_id]
        label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        annotations = self.coco.imgToAnns.get(info["id"], [])
        instances = sorted(
            (a for a in annotations if not a.get("iscrowd")), key=lambda a: -a.get("area", 0)
        )
        for annotation in instances:
            if annotation["category_id"] not in self._class_of:
                raise ValueError(
                    f"annotation {annotation.get('id')} in {self.annotation_file} has category "
                    f"{annotation['category_id']}, not one of the file's categories"
                )
            label[self._mask(annotation) > 0] = self._class_of[annotation["category_id"]] + 1
        for annotation in annotations:
            if annotation.get("iscrowd"):
                label[(self._mask(annotation) > 0) & (label == 0)] = IGNORE
        return label

    def _mask(self, annotation: dict[str, Any]) -> np.ndarray:
        """The annotation's mask, checked to be its image's size (an RLE records its own
        size; a JSON whose image sizes were edited would not fit it)."""
        try:
            mask = self.coco.annToMask(annotation)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(
                f"annotation {annotation.get('id')} in {self.annotation_file}: bad segmentation "
                f"({error!r})"
            ) from error
        image = self.coco.imgs[annotation["image_id"]]
        if mask.shape != (image["height"], image["width"]):
            raise ValueError(
                f"annotation {annotation.get('id')} in {self.annotation_file} is "
                f"{mask.shape[0]}x{mask.shape[1]} (height x width) but its image "
                f"{image['file_name']} is listed as {image['height']}x{image['width']}; expected "
                "the sizes the annotations were made at"
            )
        return mask

    def fingerprint(self) -> str:
        stat = self.annotation_file.stat()
        key = f"{self.name}:{self.annotation_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:"
        return hashlib.sha256(f"{key}{self.image_dir.resolve()}".encode()).hexdigest()


def coco_mask_source(
    name: str, image_dir: Path, mask_dir: Path, partial: bool = False
) -> PngLabelSource:
    """A COCO split with pre-rendered label PNGs. Every image needs its mask: a folder with
    masks for only some images (an interrupted rendering) is refused, counted, unless
    ``partial``, which uses the images that have one."""
    for path, what in ((image_dir, "image folder"), (mask_dir, "mask folder")):
        if not path.is_dir():
            raise missing_path_error(path, what, COCO_LAYOUT)
    files = {
        mask.stem: (image_dir / f"{mask.stem}.jpg", mask) for mask in sorted(mask_dir.glob("*.png"))
    }
    if not files:
        raise missing_path_error(mask_dir / "<image id>.png", "mask files", COCO_LAYOUT)
    images = sorted(image.stem for image in image_dir.glob("*.jpg") if visible(image))
    unmasked = [image for image in images if image not in files]
    if unmasked and not partial:
        raise ValueError(
            f"{mask_dir} has masks for {len(images) - len(unmasked)} of the {len(images)} "
            f"images in {image_dir} (no mask for {unmasked[0]}.jpg and {len(unmasked) - 1} "
            "more): render the rest with `python -m datamodules.prepare coco`, or pass "
            "--data.masks_partial true to use only the images that have one"
        )
    return PngLabelSource(name, len(COCO_CLASSES), files)


class CocoDataset(SegmentationDataset):
    """COCO 2014 (``COCO_LAYOUT``; train2014 to train, val2014 to test): 80 classes in COCO-20i's
    4 folds of 20.

    Args:
        root: the COCO folder; ``None``: ``data_dir()/coco``.
        split: the fold convention: ``interleaved`` (PFENet ``use_split_coco``, HSNet, ASGNet,
            BAM: fold ``i`` novel classes ``i+1, i+5, ..., i+77``) or ``contiguous`` (PANet:
            ``20i+1 .. 20i+20``).
        masks: folder (relative to ``root``) of pre-rendered masks; ``None`` reads the JSON.
        masks_partial: use only the images that have a mask (else a partial folder is refused).
        coco_crowd: crowd (255) pixels ``ignore``d or made ``background`` (HSNet); ``None``: the
            few-shot protocol's (:mod:`datamodules.protocols`), ignored in semantic training.
    """

    class_names = COCO_CLASSES
    protocol_family = "coco"
    protocol_unused = ("train_list",)
    #: PFENet's/ASGNet's COCO sizes; BAM's base learner batch
    defaults: ClassVar[TaskDefaults] = {
        "few_shot": {"image_size": 641, "batch_size": 8},
        "semantic": {"batch_size": 8},
    }

    def __init__(
        self,
        root: str | None = None,
        split: CocoSplit = "interleaved",
        masks: str | None = None,
        masks_partial: bool = False,
        coco_crowd: CocoCrowd | None = None,
    ) -> None:
        if split not in ("interleaved", "contiguous"):
            raise ValueError(f"split must be one of 'interleaved', 'contiguous', got {split!r}")
        super().__init__(root)
        self.split, self.masks, self.masks_partial = split, masks, masks_partial
        self.coco_crowd = coco_crowd

    def default_root(self) -> Path:
        return data_dir() / "coco"

    def fold_novel_classes(self, fold: int) -> list[int]:
        return coco_novel_classes(fold, self.split)

    def protocol_options(self) -> dict[str, Any]:
        return {"coco_crowd": self.coco_crowd}

    def make_source(self, split: Split) -> SegmentationSource:
        if not self.root.is_dir():
            raise missing_path_error(self.root, "dataset root", COCO_LAYOUT)
        folder = {"train": "train2014", "test": "val2014"}[split]
        if self.masks is not None:
            masks = self.root / self.masks / folder
            return coco_mask_source(
                f"coco-masks-{split}", self.root / folder, masks, self.masks_partial
            )
        annotations = self.root / "annotations" / f"instances_{folder}.json"
        return CocoInstancesSource(f"coco-{split}", self.root / folder, annotations)


class CocoFewShot(FewShotDataModule):
    """COCO-20i episodes: :class:`FewShotDataModule` of a :class:`CocoDataset`, under the class
    path configs and checkpoints record.

    Args:
        root: see :class:`CocoDataset`.
        split: see :class:`CocoDataset`.
        masks: see :class:`CocoDataset`.
        masks_partial: see :class:`CocoDataset`.
        coco_crowd: see :class:`CocoDataset`.
        **kwargs: see :class:`FewShotDataModule`; ``image_size`` defaults to 641 and
            ``batch_size`` to 8 (PFENet/ASGNet COCO settings).
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = CocoDataset

    def __init__(
        self,
        root: str | None = None,
        split: CocoSplit = "interleaved",
        masks: str | None = None,
        masks_partial: bool = False,
        coco_crowd: CocoCrowd | None = None,
        **kwargs: Any,
    ) -> None:
        dataset = self.dataset_class(root, split, masks, masks_partial, coco_crowd)
        super().__init__(dataset, **kwargs)
