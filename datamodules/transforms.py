"""Joint image/mask transforms on uint8 pixels: the fewest operations per pixel.

Images stay ``uint8`` from decoding to the batch (``[S, S, 3]`` arrays, masks ``[S, S]``); the
model's device converts and normalises them (:func:`datamodules.episode.to_model_inputs`), so loader
workers do no float work and batches travel in a quarter of the bytes. Every fill of the image is
the ImageNet mean colour (:data:`MEAN_FILL`, as PFENet pads with the mean pixel) or black, every
fill of the mask ``255`` (ignored).

* Training follows PFENet's ``util/transform.py`` (dvlab-research/PFENet; ASGNet and BAM share
  it): ``RandScale`` (the canvas resized by ``s``), ``RandRotate`` (+-10 degrees about the canvas
  centre with probability ``rotate_p``, canvas kept, corners turned out of it cut),
  ``RandomGaussianBlur`` (``cv2.GaussianBlur`` 5 x 5 with sigma 0: OpenCV's binomial kernel
  ``[1, 4, 6, 4, 1] / 16``, probability 0.5), ``RandomHorizontalFlip``, ``Crop('rand')`` (padded
  to the crop, centred, when smaller; up to 31 redraws of the offset while the crop keeps less
  than 85% of the foreground). The draws of one image (:class:`Augmentation`) compose into one
  map from the source image to the output crop (:class:`Plan`), rendered at crop size only: one
  ``cv2.warpAffine`` (bilinear, mean fill) for a rotated draw, PFENet's own ``cv2.resize``, flip
  and padding for the others (4x cheaper than a warp); the mask (nearest, 255 fill) at the padded
  canvas, which the foreground rule needs, then cropped. Deviations, all at edges: a rotated draw
  is interpolated once instead of PFENet's twice (resize, then rotate), which differs along the
  image's border and object outlines (``tests/test_augmentation.py`` bounds it); the blur runs on
  the crop, so within 2 pixels of the crop's border it sees the mean fill or the mirrored crop
  instead of the pixels beyond. ``resize_longer`` (this project's ``clean`` protocol) first
  scales the longer side to ``size``, so objects have the same scale in training and evaluation
  for any ``size`` (PFENet augments at the native resolution). With ``on_device`` the loaders
  ship the decoded image and its plan, and :func:`render_on_device` renders the batch.
* Evaluation: resize the longer side to ``size`` keeping the aspect ratio, place at the top-left
  and pad to ``size x size`` (image: the mean colour, mask 255); or PFENet's ``transform.Resize``
  (``floor8``: ``int()`` and each side floored to a multiple of 8, no antialiasing as
  ``cv2.INTER_LINEAR``, padded black as its zero canvas before normalisation); or, as HSNet,
  squash to ``size x size`` (``squash``). See :mod:`datamodules.protocols`. torchvision's uint8
  resize (antialiased bilinear where the protocol antialiases) computes what its float resize
  did, rounded to 8 bits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .protocols import EvalPad, EvalResize
from .source import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The mean colour in 8 bits: the fill of training crops and of ``mean``-padded evaluation.
MEAN_FILL = tuple(round(255 * mean) for mean in IMAGENET_MEAN)

#: PFENet's ``RandRotate`` range and ``RandomGaussianBlur`` kernel size (``radius=5``, sigma 0:
#: OpenCV's fixed 5-tap kernel, ``cv2.getGaussianKernel(5, 0)``).
ROTATION_DEGREES = 10.0
BLUR_KERNEL = 5
#: PFENet's ``Crop``: the offset is redrawn up to 31 times while the crop holds less than this
#: share of the canvas's foreground pixels.
CROP_KEEP = 0.85
CROP_DRAWS = 32

Pair = tuple[np.ndarray, np.ndarray]


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


@dataclass(frozen=True)
class Augmentation:
    """One image's draw of the training augmentation, in PFENet's order.

    ``scale`` multiplies the canvas (after the resize of ``resize_longer``); ``angle`` is in
    degrees, counter-clockwise as ``cv2.getRotationMatrix2D`` (0: not rotated); ``blur`` and
    ``flip`` say whether the Gaussian blur and the horizontal flip apply; ``canvas`` is the
    ``(h, w)`` after scaling and padding to the crop; ``offset`` the crop's top-left there.
    """

    scale: float
    angle: float
    blur: bool
    flip: bool
    canvas: tuple[int, int]
    offset: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """Where one training crop comes from: the draw, the map from source pixels to crop pixels
    (``2 x 3``), the scaled image's rectangle ``(top, left, height, width)`` in the crop (outside
    it the fill: PFENet rotates within that canvas), the mask crop, and the scale factor and
    ``(top, bottom, left, right)`` padding of the unrotated path."""

    draw: Augmentation
    matrix: np.ndarray
    rect: tuple[int, int, int, int]
    mask: np.ndarray
    factor: float
    padding: tuple[int, int, int, int]


def _scale_rotate_flip(
    height: int, width: int, factor: float, angle: float, flip: bool
) -> tuple[np.ndarray, int, int]:
    """The 3 x 3 map from source pixels to the scaled, rotated and flipped canvas, and its size.

    Scaling as ``cv2.resize(fx=fy=factor)`` (pixel centres: ``(x + 0.5) * f - 0.5``, size
    rounded, a copy when the rounded size is the image's), rotation as
    ``cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)``, flip as ``cv2.flip(..., 1)``
    (``x -> w - 1 - x``)."""
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    if (new_h, new_w) == (height, width):
        factor = 1.0  # cv2.resize copies an image whose rounded size is unchanged
    scale = np.array([[factor, 0, 0.5 * factor - 0.5], [0, factor, 0.5 * factor - 0.5], [0, 0, 1]])
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D((new_w / 2, new_h / 2), angle, 1.0)
    mirror = np.array([[-1.0, 0, new_w - 1], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
    return mirror @ rotate @ scale, new_h, new_w


def _fill_outside(
    pixels: np.ndarray, top: int, left: int, height: int, width: int, fill: int | tuple[int, ...]
) -> None:
    """Fill ``pixels`` outside the ``height x width`` rectangle at ``(top, left)``, in place:
    PFENet rotates within the scaled canvas, so corners turned beyond it are cut before the
    padding (which the single warp would otherwise show)."""
    bottom, right = max(top + height, 0), max(left + width, 0)
    pixels[: max(top, 0)] = fill
    pixels[bottom:] = fill
    pixels[:, : max(left, 0)] = fill
    pixels[:, right:] = fill


def _resize_flip_pad(
    pixels: np.ndarray,
    factor: float,
    flip: bool,
    padding: tuple[int, int, int, int],
    fill: int | tuple[int, ...],
    interpolation: int,
) -> np.ndarray:
    """PFENet's ``RandScale`` (``cv2.resize(fx=fy=factor)``), flip and ``Crop``'s padding
    ``(top, bottom, left, right)``: the map of :func:`_scale_rotate_flip` at angle 0."""
    scaled = cv2.resize(pixels, None, fx=factor, fy=factor, interpolation=interpolation)
    if flip:
        scaled = cv2.flip(scaled, 1)
    if not any(padding):
        return scaled
    return cv2.copyMakeBorder(scaled, *padding, cv2.BORDER_CONSTANT, value=fill)


def _crop_offset(foreground: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """PFENet's ``Crop('rand')`` offset: uniform, redrawn (at most 31 times) while the crop keeps
    less than :data:`CROP_KEEP` of the canvas's foreground; the last draw stands otherwise."""
    height, width = foreground.shape
    ys = rng.integers(0, height - size + 1, CROP_DRAWS)
    xs = rng.integers(0, width - size + 1, CROP_DRAWS)
    total = int(np.count_nonzero(foreground))
    if total == 0:
        return int(ys[0]), int(xs[0])
    table = cv2.integral(foreground.view(np.uint8))
    kept = table[ys + size, xs + size] - table[ys, xs + size] - table[ys + size, xs] + table[ys, xs]
    good = np.flatnonzero(kept >= CROP_KEEP * total)
    pick = int(good[0]) if good.size else CROP_DRAWS - 1
    return int(ys[pick]), int(xs[pick])


class TrainTransform:
    """PFENet's training augmentation as one warp per image (module docstring).

    Args:
        size: the square crop.
        scale: range of the random scale factor (PFENet PASCAL 0.9-1.1, COCO 0.8-1.25).
        rotate_p: probability of a rotation (PFENet's ``RandRotate``: 0.5).
        resize_longer: first resize the longer side to ``size`` (this project's ``clean``).
        on_device: loaders ship the decoded image and its :class:`Plan`; the model's device
            renders the crops (:func:`render_on_device`), for nodes with few cores per GPU.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate_p: float = 1.0,
        resize_longer: bool = True,
        on_device: bool = False,
    ) -> None:
        self.size, self.scale, self.rotate_p = size, tuple(scale), rotate_p
        self.resize_longer, self.on_device = resize_longer, on_device

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        """``uint8`` image ``[S, S, 3]`` and mask ``[S, S]``."""
        return self.augment(image, mask, rng)[:2]

    def augment(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, Augmentation]:
        """The augmented ``uint8`` image ``[S, S, 3]``, mask ``[S, S]`` and the draw."""
        plan = self.plan(mask, rng)
        return self.render(image, plan), plan.mask, plan.draw

    def plan(self, mask: np.ndarray, rng: np.random.Generator) -> Plan:
        """One image's draw, its map and its mask crop (the crop offset needs the warped mask);
        the image is warped by :meth:`render`, or on the device (:func:`render_on_device`)."""
        low, high = self.scale
        scale = low + (high - low) * rng.random()
        angle = 0.0
        if rng.random() < self.rotate_p:
            angle = ROTATION_DEGREES * (2 * rng.random() - 1)
        blur, flip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        height, width = mask.shape
        factor = scale * (self.size / max(height, width) if self.resize_longer else 1.0)
        matrix, new_h, new_w = _scale_rotate_flip(height, width, factor, angle, flip)
        canvas_h, canvas_w = max(new_h, self.size), max(new_w, self.size)
        pad_top, pad_left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2  # centred padding
        padding = (pad_top, canvas_h - new_h - pad_top, pad_left, canvas_w - new_w - pad_left)
        matrix[:2, 2] += (pad_left, pad_top)
        if angle:
            canvas_mask = cv2.warpAffine(
                mask, matrix[:2], (canvas_w, canvas_h), flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE,
            )  # fmt: skip
            _fill_outside(canvas_mask, pad_top, pad_left, new_h, new_w, IGNORE)
        else:  # PFENet's own resize: the same map, 4x cheaper than a warp
            canvas_mask = _resize_flip_pad(mask, factor, flip, padding, IGNORE, cv2.INTER_NEAREST)
        top, left = _crop_offset(canvas_mask == 1, self.size, rng)
        matrix[:2, 2] -= (left, top)
        crop_mask = np.ascontiguousarray(
            canvas_mask[top : top + self.size, left : left + self.size]
        )
        draw = Augmentation(scale, angle, blur, flip, (canvas_h, canvas_w), (top, left))
        rect = (pad_top - top, pad_left - left, new_h, new_w)
        return Plan(draw, matrix[:2], rect, crop_mask, factor, padding)

    def render(self, image: np.ndarray, plan: Plan) -> np.ndarray:
        """The crop of ``plan`` from ``image``: one warp (rotated draws) or PFENet's resize,
        flip and padding (unrotated ones), then the blur."""
        draw, size = plan.draw, self.size
        if draw.angle:
            crop = cv2.warpAffine(
                image, plan.matrix, (size, size), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_FILL,
            )  # fmt: skip
            _fill_outside(crop, *plan.rect, MEAN_FILL)
        else:
            canvas = _resize_flip_pad(
                image, plan.factor, draw.flip, plan.padding, MEAN_FILL, cv2.INTER_LINEAR
            )
            top, left = draw.offset
            crop = np.ascontiguousarray(canvas[top : top + size, left : left + size])
        if draw.blur:
            crop = cv2.GaussianBlur(crop, (BLUR_KERNEL, BLUR_KERNEL), 0)
        return crop

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
            f"rotate_p={self.rotate_p}, resize_longer={self.resize_longer}, "
            f"on_device={self.on_device})"
        )


class EvalTransform:
    """Longer side to ``size``, top-left placement, pad to ``size x size`` with the mean colour
    or black and 255; or squash to ``size x size`` (HSNet). Deterministic (``rng`` unused)."""

    def __init__(self, size: int, resize: EvalResize = "longer_pad", pad: EvalPad = "mean") -> None:
        self.size, self.resize, self.pad = size, resize, pad

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> Pair:
        """``uint8`` image ``[S, S, 3]`` and mask ``[S, S]``."""
        target = list(valid_size(*mask.shape, self.size, self.resize))
        pixels = F.resize(
            torch.from_numpy(image).permute(2, 0, 1), target, antialias=self.resize != "floor8"
        )
        labels = F.resize(torch.from_numpy(mask)[None], target, InterpolationMode.NEAREST)[0]
        resized, labels_np = pixels.permute(1, 2, 0).numpy(), labels.numpy()
        if self.resize == "squash":
            return np.ascontiguousarray(resized), np.ascontiguousarray(labels_np)
        canvas = np.empty((self.size, self.size, 3), dtype=np.uint8)
        canvas[:] = MEAN_FILL if self.pad == "mean" else 0
        canvas[: target[0], : target[1]] = resized
        padded = np.full((self.size, self.size), IGNORE, dtype=np.uint8)
        padded[: target[0], : target[1]] = labels_np
        return canvas, padded

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize!r}, pad={self.pad!r})"


def train_transform(
    size: int,
    scale: Sequence[float] = (0.9, 1.1),
    rotate_p: float = 1.0,
    resize_longer: bool = True,
    augment: bool = True,
    on_device: bool = False,
) -> TrainTransform | EvalTransform:
    """The training transform of a protocol: :class:`TrainTransform`, or with ``augment=False``
    a squash to ``size x size`` only (HSNet trains without augmentation; always on the CPU)."""
    if not augment:
        return EvalTransform(size, "squash")
    low, high = scale
    return TrainTransform(size, (low, high), rotate_p, resize_longer, on_device)


def eval_transform(
    size: int, resize: EvalResize = "longer_pad", pad: EvalPad = "mean"
) -> EvalTransform:
    """Longer side to ``size``, top-left placement, pad to ``size x size``; or squash to
    ``size x size`` (HSNet)."""
    return EvalTransform(size, resize, pad)


@functools.cache
def _normalisation(device: torch.device) -> tuple[Tensor, Tensor]:
    """``1 / (255 std)`` and ``mean / std`` as ``[3, 1, 1]`` tensors on ``device``, made once."""
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    return (1 / (255 * std)).float().to(device), (mean / std).float().to(device)


def normalise(images: Tensor) -> Tensor:
    """``uint8`` images ``[..., 3, H, W]`` to float32 with the ImageNet mean/std on their own
    device, in one multiply-subtract (``(x / 255 - m) / s = x / (255 s) - m / s``), contiguous
    whatever the input's memory order (loaders stack pixels channels-last)."""
    scale, shift = _normalisation(images.device)
    floats = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    return floats.copy_(images).mul_(scale).sub_(shift)


def inverse_map(matrix: np.ndarray) -> np.ndarray:
    """The ``2 x 3`` map from crop pixels back to source pixels, of a source-to-crop ``matrix``."""
    return cv2.invertAffineTransform(matrix).astype(np.float32)


def render_on_device(
    sources: Tensor,
    inverse: Tensor,
    rects: Tensor,
    blur: Tensor,
    rotated: Tensor,
    sizes: Tensor,
    size: int,
) -> Tensor:
    """:meth:`TrainTransform.render` for a batch, on the sources' device: ``uint8`` sources
    ``[N, 3, H, W]`` (each image at the top-left, padded with :data:`MEAN_FILL`; ``sizes``
    ``[N, 2]`` their own ``(h, w)``), their crop-to-source maps ``[N, 2, 3]``
    (:func:`inverse_map`), and their :class:`Plan` s' rectangles ``[N, 4]``, blur and rotation
    flags ``[N]``; crops ``[N, 3, S, S]`` as float32 values in ``0..255``, rounded as the CPU's
    ``uint8`` results.

    One batched bilinear ``grid_sample`` (pixel centres, ``align_corners=False``, as OpenCV):
    a rotated draw samples beyond its image the mean fill (``warpAffine``'s constant border:
    the difference to the fill is sampled with zero padding), an unrotated one its edge pixels
    (``resize``'s replicated border: coordinates clamped to the image); then the fill outside
    each rectangle and OpenCV's 5-tap kernel (``getGaussianKernel(5, 0)``, reflect-101 border)
    where flagged."""
    device = sources.device
    fill = torch.tensor(MEAN_FILL, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    height, width = sources.shape[-2:]
    pixels = torch.arange(size, dtype=torch.float32, device=device)
    v, u = torch.meshgrid(pixels, pixels, indexing="ij")
    base = torch.stack([u, v, torch.ones_like(u)], -1)  # [S, S, 3]: (x, y, 1) per crop pixel
    source_xy = torch.einsum("hwk,nck->nhwc", base, inverse.float())
    last = (sizes.to(device).flip(-1).float() - 1).view(-1, 1, 1, 2)  # (w - 1, h - 1)
    clamped = torch.minimum(source_xy.clamp(min=0), last)
    source_xy = torch.where(rotated.to(device).view(-1, 1, 1, 1), source_xy, clamped)
    scale = torch.tensor([2 / width, 2 / height], device=device)
    grid = (source_xy + 0.5) * scale - 1
    difference = sources.float() - fill
    crops = nnf.grid_sample(difference, grid, "bilinear", "zeros", align_corners=False) + fill
    top, left, rect_h, rect_w = rects.to(device).unbind(1)
    rows = (pixels >= top[:, None]) & (pixels < (top + rect_h)[:, None])  # [N, S]
    cols = (pixels >= left[:, None]) & (pixels < (left + rect_w)[:, None])
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]
    crops = torch.where(inside, crops.round().clamp(0, 255), fill)
    kernel = torch.from_numpy(cv2.getGaussianKernel(BLUR_KERNEL, 0)).float().to(device)
    half = BLUR_KERNEL // 2
    padded = nnf.pad(crops, (half, half, half, half), mode="reflect")
    blurred = nnf.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    blurred = nnf.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return torch.where(blur.to(device).view(-1, 1, 1, 1), blurred.round(), crops)
