"""Joint image/mask transforms (torchvision.transforms.v2 with ``tv_tensors.Mask``).

Images are normalised with the ImageNet mean/std first, so every fill of the image is ``0`` (the
mean colour, as PFENet pads with the mean pixel) and every fill of the mask is ``255`` (ignored).

* Training (after PFENet/ASGNet: RandScale 0.9-1.1, RandRotate +-10, RandomGaussianBlur,
  RandomHorizontalFlip, Crop with label padding 255): the image is first resized so its longer
  side is ``size``, exactly as in evaluation, so that objects have the same scale in training and
  testing for any ``size`` (PFENet crops at native scale, which for VOC's 500 px images and a
  473 crop differs by under 6%).
* Evaluation: resize the longer side to ``size`` keeping the aspect ratio, place at the top-left
  and pad to ``size x size`` (image: the mean colour, mask 255); or PFENet's ``transform.Resize``
  (``floor8``: ``int()`` and each side floored to a multiple of 8, no antialiasing as
  ``cv2.INTER_LINEAR``, padded black as its zero canvas before normalisation); or, as HSNet,
  squash to ``size x size`` (``squash``). See :mod:`datamodules.protocols`.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .protocols import EvalPad, EvalResize
from .source import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE}


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the longer side to ``size`` with the aspect ratio kept."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def floor8_size(height: int, width: int, size: int) -> tuple[int, int]:
    """PFENet's ``transform.Resize`` (``find_new_hw``): the longer side to ``size``, ``int()`` of
    the other, then each side floored to a multiple of 8 (at least 8)."""
    if height >= width:
        new_h, new_w = size, int(width * (size * 1.0 / height))
    else:
        new_h, new_w = int(height * (size * 1.0 / width)), size
    return max(8, new_h - new_h % 8), max(8, new_w - new_w % 8)


def valid_size(height: int, width: int, size: int, resize: EvalResize) -> tuple[int, int]:
    """``(h, w)`` of an ``height x width`` image inside the ``size x size`` evaluation input."""
    if resize == "longer_pad":
        return resized_size(height, width, size)
    if resize == "floor8":
        return floor8_size(height, width, size)
    return size, size


class ResizeLonger:
    """Resize image (bilinear) and mask (nearest) so the longer side is ``size``: rounded and
    antialiased (``longer_pad``), or PFENet's floored sizes without antialiasing (``floor8``)."""

    def __init__(self, size: int, resize: EvalResize = "longer_pad") -> None:
        self.size, self.resize = size, resize

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        target = list(valid_size(*image.shape[-2:], self.size, self.resize))
        antialias = self.resize == "longer_pad"
        return F.resize(image, target, antialias=antialias), F.resize(mask, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize!r})"


class PadBottomRight:
    """Pad to ``size x size`` at the bottom/right, the mask with 255 and the image with the mean
    colour (0 after normalisation) or black (PFENet's zero canvas, ``-mean / std``)."""

    def __init__(self, size: int, pad: EvalPad = "mean") -> None:
        self.size, self.pad = size, pad

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        height, width = image.shape[-2:]
        canvas = torch.zeros((image.shape[0], self.size, self.size), dtype=image.dtype)
        if self.pad == "black":
            black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
            canvas += torch.tensor(black, dtype=image.dtype)[:, None, None]
        canvas[:, :height, :width] = image
        padding = [0, 0, self.size - width, self.size - height]
        return tv_tensors.wrap(canvas, like=image), F.pad(mask, padding, fill=IGNORE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, pad={self.pad!r})"


def _to_normalised() -> list:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transform(
    size: int,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate_p: float = 1.0,
    resize_longer: bool = True,
    augment: bool = True,
) -> v2.Compose:
    """PFENet's augmentation: random scale, rotation +-10 degrees with probability ``rotate_p``
    (PFENet's ``RandRotate``: 0.5), Gaussian blur, flip, crop ``size`` padded with the mean and
    255; after resizing the longer side to ``size`` (``resize_longer``, this project) or at the
    native resolution (PFENet). ``augment=False`` squashes to ``size x size`` only (HSNet)."""
    if not augment:
        return v2.Compose([*_to_normalised(), v2.Resize((size, size), antialias=True)])

    def affine(degrees: float) -> v2.RandomAffine:
        interpolation = v2.InterpolationMode.BILINEAR
        return v2.RandomAffine(degrees, scale=scale, interpolation=interpolation, fill=_FILL)

    if rotate_p >= 1:
        geometry: v2.Transform = affine(10)
    else:  # one interpolation either way
        geometry = v2.RandomChoice([affine(10), affine(0)], p=[rotate_p, 1 - rotate_p])
    return v2.Compose(
        [
            *_to_normalised(),
            *([ResizeLonger(size)] if resize_longer else []),
            geometry,
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, pad_if_needed=True, fill=_FILL),
        ]
    )


def eval_transform(
    size: int, resize: EvalResize = "longer_pad", pad: EvalPad = "mean"
) -> v2.Compose:
    """Longer side to ``size``, top-left placement, pad to ``size x size``; or squash to
    ``size x size`` (HSNet)."""
    if resize == "squash":
        return v2.Compose([*_to_normalised(), v2.Resize((size, size), antialias=True)])
    return v2.Compose([*_to_normalised(), ResizeLonger(size, resize), PadBottomRight(size, pad)])
