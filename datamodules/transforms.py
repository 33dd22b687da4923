"""Joint image/mask transforms (torchvision.transforms.v2 with ``tv_tensors.Mask``).

Images are normalised with the ImageNet mean/std first, so every fill of the image is ``0`` (the
mean colour, as PFENet pads with the mean pixel) and every fill of the mask is ``255`` (ignored).

* Training (after PFENet/ASGNet: RandScale 0.9-1.1, RandRotate +-10, RandomGaussianBlur,
  RandomHorizontalFlip, Crop with label padding 255): the image is first resized so its longer
  side is ``size``, exactly as in evaluation, so that objects have the same scale in training and
  testing for any ``size`` (PFENet crops at native scale, which for VOC's 500 px images and a
  473 crop differs by under 6%).
* Evaluation (PFENet ``test_Resize``): resize the longer side to ``size`` keeping the aspect
  ratio, place at the top-left and pad to ``size x size`` (image 0, mask 255); or, as HSNet,
  squash to ``size x size`` (``resize="squash"``, see :mod:`datamodules.protocols`).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .protocols import EvalResize
from .source import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE}


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the longer side to ``size`` with the aspect ratio kept."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def valid_size(height: int, width: int, size: int, resize: EvalResize) -> tuple[int, int]:
    """``(h, w)`` of an ``height x width`` image inside the ``size x size`` evaluation input."""
    return resized_size(height, width, size) if resize == "longer_pad" else (size, size)


class ResizeLonger:
    """Resize image (bilinear, antialiased) and mask (nearest) so the longer side is ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        target = list(resized_size(*image.shape[-2:], self.size))
        return F.resize(image, target, antialias=True), F.resize(mask, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class PadBottomRight:
    """Pad to ``size x size`` at the bottom/right (image 0, mask 255), as PFENet's test_Resize."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        height, width = image.shape[-2:]
        padding = [0, 0, self.size - width, self.size - height]
        return F.pad(image, padding, fill=0.0), F.pad(mask, padding, fill=IGNORE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _to_normalised() -> list:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transform(size: int) -> v2.Compose:
    """Random scale 0.9-1.1, rotation +-10 degrees, Gaussian blur, flip, crop ``size`` (PFENet)."""
    return v2.Compose(
        [
            *_to_normalised(),
            ResizeLonger(size),
            v2.RandomAffine(
                degrees=10,
                scale=(0.9, 1.1),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=_FILL,
            ),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, pad_if_needed=True, fill=_FILL),
        ]
    )


def eval_transform(size: int, resize: EvalResize = "longer_pad") -> v2.Compose:
    """Longer side to ``size``, top-left placement, pad to ``size x size`` (PFENet test_Resize),
    or squash to ``size x size`` (HSNet)."""
    if resize == "squash":
        return v2.Compose([*_to_normalised(), v2.Resize((size, size), antialias=True)])
    return v2.Compose([*_to_normalised(), ResizeLonger(size), PadBottomRight(size)])
