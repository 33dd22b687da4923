"""A generated VOC-like tree of photo-sized JPEGs, for loader benchmarks on real-sized data.

PASCAL VOC images are mostly 500 x 375 or 375 x 500 JPEGs; ``SegmentationClassAug`` labels are
single-channel PNGs with 255 object borders. Each generated image has textured content (smooth
colour fields plus grain, which is what makes JPEG decoding cost what it costs on photos) and 1-3
objects of VOC classes 1-20, each with a 5-pixel 255 border as VOC draws them. Lists: PFENet's
path-pair training list and VOC's id-only ``val.txt``, the layout ``datamodules.PascalFewShot``
reads under every preset.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datamodules.protocols import NODUPLICATE_LIST, TRAIN_AUG_LIST

SIZES = ((375, 500), (500, 375))
BORDER = 5


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field with grain, ``uint8 [H, W, 3]``."""
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    grain = rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return np.clip(field + grain, 0, 255).astype(np.uint8)


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    image = _texture(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        shape = np.zeros((height, width), dtype=np.uint8)
        centre = (int(rng.integers(60, width - 60)), int(rng.integers(60, height - 60)))
        axes = (int(rng.integers(40, width // 3)), int(rng.integers(40, height // 3)))
        cv2.ellipse(shape, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        inside = shape.astype(bool)
        image[inside] = _texture(rng, height, width)[inside]
        outline = cv2.dilate(shape, np.ones((BORDER, BORDER), np.uint8)).astype(bool) & ~inside
        label[inside] = rng.integers(1, 21)
        label[outline] = 255
    return image, label


def write_voc_like_tree(root: Path, train: int = 400, test: int = 150, seed: int = 0) -> Path:
    """``train`` + ``test`` images in the VOC layout under ``root`` (kept if already there)."""
    done = root / "ImageSets" / "Segmentation" / "val.txt"
    if done.is_file():
        return root
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation",
                   "ImageSets/SegmentationAug", "lists/pascal"):  # fmt: skip
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = {"train": [], "test": []}
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            image_id = f"2008_{split}{index:05d}"
            height, width = SIZES[index % 2]
            image, label = _scene(rng, height, width)
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), bgr,
                        [cv2.IMWRITE_JPEG_QUALITY, 90])  # fmt: skip
            cv2.imwrite(str(root / "SegmentationClassAug" / f"{image_id}.png"), label)
            ids[split].append(image_id)
    pairs = [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in ids["train"]]
    for list_file in (NODUPLICATE_LIST, TRAIN_AUG_LIST):
        (root / list_file).write_text("\n".join(pairs) + "\n")
    done.write_text("\n".join(ids["test"]) + "\n")
    return root
