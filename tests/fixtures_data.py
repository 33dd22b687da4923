"""Tiny on-disk PASCAL and COCO trees in the real formats, written by the tests themselves.

Every image is 80 x 96 and holds two classes: a "big" 32 x 64 rectangle of exactly
2 * 32 * 32 = 2048 pixels (eligible under the OSLSM rule) and a "small" one of 2047 pixels (not
eligible), so the ``min_pixels`` boundary is exercised by every image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import PascalFewShot
from datamodules.coco import COCO_CLASSES
from datamodules.pascal import save_label_png

HEIGHT, WIDTH = 80, 96
BIG = (slice(4, 36), slice(4, 68))  # 32 x 64 = 2048 pixels
SMALL = (slice(42, 74), slice(4, 68))  # 2048 pixels minus the one at SMALL_HOLE
SMALL_HOLE = (42, 4)
# Real COCO 2014 category ids: 80 ids in 1..90 with gaps.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def pascal_label(big: int, small: int) -> np.ndarray:
    """A VOC label: 1-based class ``big`` on 2048 pixels, ``small`` (0: none) on 2047 pixels,
    and a vertical 255 line."""
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    label[BIG] = big
    label[SMALL] = small
    label[SMALL_HOLE] = 0
    label[:, 80] = 255
    return label


def write_pascal_tree(root: Path, num_train: int = 200, num_test: int = 40) -> Path:
    """VOC layout with SBD-style training list (path pairs) and a VOC-style test list (ids).

    Training image ``i`` (``k = i // 20``) has big class ``i % 20 + 1`` and, when ``k`` is even,
    small class ``(i + 1 + k) % 20 + 1``, so the small classes next to a class vary. Test image
    ``j`` has big class ``j % 20 + 1`` and small ``(j + 3) % 20 + 1``. With the defaults every
    class is eligible in 10 training and 2 test images.
    """
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/SegmentationAug",
                   "ImageSets/Segmentation"):  # fmt: skip
        (root / folder).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            image_id = f"2008_{split}{index:04d}"
            Image.fromarray(_image(index + 1000 * (split == "test"))).save(
                root / "JPEGImages" / f"{image_id}.jpg", quality=90
            )
            if split == "train":
                k = index // 20
                small = (index + 1 + k) % 20 + 1 if k % 2 == 0 else 0
                lists[split].append(
                    f"/JPEGImages/{image_id}.jpg /SegmentationClassAug/{image_id}.png"
                )
            else:
                small = (index + 3) % 20 + 1
                lists[split].append(image_id)
            label = pascal_label(index % 20 + 1, small)
            save_label_png(label, root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets/SegmentationAug/train_aug.txt").write_text("\n".join(lists["train"]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(lists["test"]) + "\n")
    return root


def _box_polygon(rows: slice, cols: slice) -> list[list[float]]:
    top, bottom, left, right = rows.start, rows.stop, cols.start, cols.stop
    return [[left, top, right, top, right, bottom, left, bottom]]


def write_coco_tree(root: Path, num_images: int = 80) -> Path:
    """COCO 2014 layout; both splits hold ``num_images`` images with two annotations each.

    Image ``j`` has a polygon of category index ``j % 80`` over ``BIG`` and an uncompressed RLE of
    index ``(j + 40) % 80`` over ``SMALL`` but filled (2048 pixels), so with 80 images every class
    is eligible in exactly 2 images. Image 0 also has a crowd region (compressed RLE) at the
    right edge.
    """
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(num_images):
            file_name = f"COCO_{split}_{index:012d}.jpg"
            Image.fromarray(_image(index)).save(root / split / file_name, quality=90)
            images.append(
                {"id": index + 1, "file_name": file_name, "height": HEIGHT, "width": WIDTH}
            )
            annotations.append(
                {"id": 2 * index + 1, "image_id": index + 1, "iscrowd": 0, "area": 2048.0,
                 "category_id": COCO_CATEGORY_IDS[index % 80],
                 "segmentation": _box_polygon(*BIG)}
            )  # fmt: skip
            small = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            small[SMALL] = 1
            rle = {"size": [HEIGHT, WIDTH], "counts": _uncompressed_counts(small)}
            annotations.append(
                {"id": 2 * index + 2, "image_id": index + 1, "iscrowd": 0, "area": 2048.0,
                 "category_id": COCO_CATEGORY_IDS[(index + 40) % 80], "segmentation": rle}
            )  # fmt: skip
        crowd = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        crowd[:, 86:] = 1
        encoded = mask_utils.encode(np.asfortranarray(crowd))
        encoded["counts"] = encoded["counts"].decode()
        annotations.append(
            {"id": 10_000, "image_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
             "category_id": COCO_CATEGORY_IDS[0], "segmentation": encoded}
        )  # fmt: skip
        categories = [
            {"id": i, "name": name} for i, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)
        ]
        (root / "annotations").mkdir(exist_ok=True)
        content = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: alternating run lengths of 0s and 1s in column-major order."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def pascal(root: Path, tmp_path: Path, **kwargs) -> PascalFewShot:
    """A PascalFewShot on a tree of :func:`write_pascal_tree`, small settings, cache in tmp."""
    settings = {"num_workers": 0, "batch_size": 4, "image_size": 64, "val_fraction": 0.2}
    return PascalFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), **settings | kwargs)
