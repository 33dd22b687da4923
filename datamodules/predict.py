"""Episodes for ``predict``: the user's own support images with masks, and query images.

Every query is segmented with the same support set. Support masks are label PNGs: 255 is ignored,
any other non-zero value is the object (palette PNGs as VOC's work, so do 0/1 and 0/255 masks).
Items carry the evaluation geometry of :mod:`datamodules.episode` (``query_size``,
``query_valid``, ``query_id``) and ``query_path``, so that the prediction is written at the
query's original size beside an overlay. Images are read as viewers show them (EXIF orientation
applied, :func:`datamodules.source.open_image`): support masks match, and predictions come out
at, the photo as shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .episode import Batch, JointTransform, image_tensor
from .files import IMAGE_EXTENSIONS, visible
from .source import IGNORE, open_image, open_label_png, orientation_note
from .transforms import resized_size


def expand_images(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their images in sorted order."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(
                p for p in entry.iterdir() if visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise FileNotFoundError(f"predict query folder {str(entry)!r} holds no images")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"predict input {str(entry)!r} does not exist")
    return files


def support_mask(path: Path, image_hw: tuple[int, int], image_path: Path) -> np.ndarray:
    """The binary (0/1/255) mask of a support image of ``image_hw`` as shown (EXIF orientation
    applied: users draw on the photo they see); the mask itself is not turned."""
    label = open_label_png(path)
    if label.shape != image_hw:
        raise ValueError(
            f"support mask {str(path)!r} is {label.shape[1]}x{label.shape[0]} but its image "
            f"{str(image_path)!r} is {image_hw[1]}x{image_hw[0]}{orientation_note(image_path)} "
            "(width x height)"
        )
    binary = (label > 0).astype(np.uint8)
    if ((label > 0) & (label != IGNORE)).any():  # 255 is the object in a 0/255 mask
        binary[label == IGNORE] = IGNORE
    if not (binary == 1).any():
        raise ValueError(f"support mask {str(path)!r} marks no object pixel")
    return binary


class PredictEpisodes(Dataset):
    """One item per query image, all sharing the given support set."""

    def __init__(
        self,
        support_images: Sequence[str],
        support_masks: Sequence[str],
        queries: Sequence[str],
        transform: JointTransform,
        size: int,
    ) -> None:
        if not support_images:
            raise ValueError("predict needs at least one support image (data.predict_support)")
        if len(support_masks) != len(support_images):
            raise ValueError(
                f"predict needs one mask per support image: got {len(support_images)} support "
                f"images (data.predict_support) and {len(support_masks)} masks "
                "(data.predict_support_masks)"
            )
        self.queries = expand_images(queries)
        if not self.queries:
            raise ValueError("predict needs query images (data.predict_queries)")
        self.transform = transform
        self.size = size
        pairs = [(Path(i), Path(m)) for i, m in zip(support_images, support_masks, strict=True)]
        loaded = [self.transform(*self._read_support(image, mask), None) for image, mask in pairs]
        self.support_images = image_tensor(np.stack([image for image, _ in loaded]))
        self.support_masks = torch.from_numpy(np.stack([mask for _, mask in loaded]))

    @staticmethod
    def _read_support(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        for path, what in ((image_path, "support image"), (mask_path, "support mask")):
            if not path.is_file():
                raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
        image = open_image(image_path)
        return image, support_mask(mask_path, image.shape[:2], image_path)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> Batch:
        path = self.queries[index]
        image = open_image(path)
        height, width = image.shape[:2]
        query_image, _ = self.transform(image, np.zeros((height, width), dtype=np.uint8), None)
        return {
            "query_image": image_tensor(query_image),
            "support_images": self.support_images,
            "support_masks": self.support_masks,
            "query_size": torch.tensor([height, width]),
            "query_valid": torch.tensor(resized_size(height, width, self.size)),
            "query_id": path.stem,
            "query_path": str(path),
        }
