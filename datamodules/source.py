"""Segmentation sources: one split of a dataset as ids, RGB images and class-index label maps.

Every source speaks one label convention whatever the on-disk format: ``0`` background,
``c + 1`` for class index ``c`` (so VOC class ``k`` is index ``k - 1``), ``255`` ignore
(VOC object borders, COCO crowd regions). Sources validate what they read and name the file in
every error.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

IGNORE = 255

# Loader processes are the parallelism: OpenCV's own thread pool would oversubscribe the cores,
# and a pool started before the loader forks its workers deadlocks them.
cv2.setNumThreads(1)


def _has_values_above(label: np.ndarray, num_classes: int) -> bool:
    """Whether ``label`` holds a value above ``num_classes`` other than 255: one ``cv2.inRange``
    pass for ``uint8`` maps (several times faster than ``np.unique`` in the loaders' hot path),
    NumPy for wider ones (FolderFewShot's ``int32`` maps of over 254 classes)."""
    if label.dtype == np.uint8:
        return bool(cv2.countNonZero(cv2.inRange(label, num_classes + 1, IGNORE - 1)))
    return bool(np.any((label > num_classes) & (label != IGNORE)))


def missing_path_error(path: Path, what: str, layout: str) -> FileNotFoundError:
    """An error naming the missing path and showing the layout the loader expects."""
    return FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")


#: EXIF orientations that swap width and height (a quarter turn, with or without a flip)
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 when absent or invalid) that viewers apply to ``image``.

    Phone photos are stored sideways with a tag saying how to turn them; users see, and draw
    masks on, the turned photo. Read from the header only: a PNG's ``getexif()`` would decode
    every pixel looking for EXIF after them (where OpenCV and torchvision do not look either)."""
    if isinstance(image, PngImagePlugin.PngImageFile) and "exif" not in image.info:
        return 1
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in range(1, 9) else 1


def orientation_note(path: Path) -> str:
    """``" as shown (EXIF orientation k applied)"`` for an image read turned, else ``""``: a size
    error then says that the size is the photo's as shown, not as stored."""
    with Image.open(path) as image:
        orientation = exif_orientation(image)
    return f" as shown (EXIF orientation {orientation} applied)" if orientation != 1 else ""


def open_image(path: Path) -> np.ndarray:
    """Decode an RGB image as ``uint8 [H, W, 3]`` as viewers show it (its EXIF orientation
    applied, as ``ImageOps.exif_transpose``); a corrupt or missing file names itself.

    OpenCV decodes (libjpeg-turbo, faster than Pillow for JPEGs, as PFENet/BAM read) with its
    own EXIF rotation off, so that Pillow's header alone decides the orientation, as in
    :func:`image_size`. A turned image (rare), or a format OpenCV cannot read, goes to Pillow,
    whose error then names the problem."""
    try:
        with Image.open(path) as image:
            if exif_orientation(image) != 1:
                return np.array(ImageOps.exif_transpose(image).convert("RGB"))
            encoded = np.fromfile(path, dtype=np.uint8)
            pixels = cv2.imdecode(encoded, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if pixels is None:
                return np.array(image.convert("RGB"))
            return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` as :func:`open_image` returns the image (EXIF orientation applied),
    from the header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            if exif_orientation(image) in TRANSPOSING_ORIENTATIONS:
                return image.width, image.height
            return image.height, image.width
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def open_label_png(path: Path) -> np.ndarray:
    """Decode a single-channel (palette or grayscale) label PNG as ``uint8 [H, W]``."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L"):
                raise ValueError(f"mode {label.mode}, expected a palette (P) or grayscale (L) PNG")
            return np.array(label)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read label {path}: {error}") from error


class SegmentationSource(ABC):
    """One split of a segmentation dataset.

    Args:
        name: short name, used in cache file names (``pascal-train``).
        num_classes: number of object classes; valid label values are ``0..num_classes, 255``.
    """

    def __init__(self, name: str, num_classes: int) -> None:
        self.name = name
        self.num_classes = num_classes

    @property
    @abstractmethod
    def ids(self) -> list[str]:
        """Image ids of the split, in a fixed order."""

    @abstractmethod
    def image_path(self, image_id: str) -> Path:
        """Path of the RGB image."""

    @abstractmethod
    def label_origin(self, image_id: str) -> str:
        """Where the label comes from, for error messages (a file, or an annotation file)."""

    @abstractmethod
    def _decode_label(self, image_id: str) -> np.ndarray:
        """The raw ``uint8 [H, W]`` label map, not yet validated."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes whenever the split's files or settings change."""

    def read_label(self, image_id: str) -> np.ndarray:
        """The validated label map: only values ``0..num_classes`` and ``255``."""
        label = self._decode_label(image_id)
        if _has_values_above(label, self.num_classes):
            values = np.unique(label)
            bad = values[(values > self.num_classes) & (values != IGNORE)]
            raise ValueError(
                f"label {self.label_origin(image_id)} has values {bad.tolist()} that are not "
                f"classes (allowed: 0..{self.num_classes} and {IGNORE})"
            )
        return label

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image ``uint8 [H, W, 3]`` and validated label ``uint8 [H, W]`` of the same size."""
        image = open_image(self.image_path(image_id))
        label = self.read_label(image_id)
        self._check_size(image_id, image.shape[:2], label.shape)
        return image, label

    def class_pixels(self, image_id: str) -> dict[int, int]:
        """Pixels per 0-based class present in the label; checks the image header too."""
        label = self.read_label(image_id)
        self._check_size(image_id, image_size(self.image_path(image_id)), label.shape)
        counts = np.bincount(label.ravel(), minlength=256)[1 : self.num_classes + 1]
        return {int(cls): int(pixels) for cls, pixels in enumerate(counts) if pixels}

    def _check_size(self, image_id: str, image_hw: Sequence[int], label_hw: Sequence[int]) -> None:
        if tuple(image_hw) != tuple(label_hw):
            path = self.image_path(image_id)
            raise ValueError(
                f"size mismatch: image {path} is {tuple(image_hw)}{orientation_note(path)} but "
                f"label {self.label_origin(image_id)} is {tuple(label_hw)} (height, width)"
            )


class PngLabelSource(SegmentationSource):
    """A split whose labels are single-channel PNG files (VOC, SBD-augmented VOC, rendered COCO).

    Args:
        name: short name for cache files.
        num_classes: number of object classes.
        files: image id -> (image path, label path), in split order.
    """

    def __init__(self, name: str, num_classes: int, files: Mapping[str, tuple[Path, Path]]) -> None:
        super().__init__(name, num_classes)
        self._files = dict(files)

    @property
    def ids(self) -> list[str]:
        return list(self._files)

    def image_path(self, image_id: str) -> Path:
        return self._files[image_id][0]

    def label_origin(self, image_id: str) -> str:
        return str(self._files[image_id][1])

    def _decode_label(self, image_id: str) -> np.ndarray:
        return open_label_png(self._files[image_id][1])

    def fingerprint(self) -> str:
        """Paths, sizes and modification times of every file (stat only, no decoding)."""
        digest = hashlib.sha256(f"{self.name}:{self.num_classes}".encode())
        for image_id, paths in self._files.items():
            digest.update(image_id.encode())
            for path in paths:
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"file listed for {image_id!r} not found: {path}"
                    ) from None
                digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
