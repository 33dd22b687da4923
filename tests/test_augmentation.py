"""The training augmentation of every preset: its draws follow PFENet's rule (``util/transform.py``
of dvlab-research/PFENet, which ASGNet and BAM share) with the preset's scale range, rotation
probability and resize, and each draw's output equals PFENet's sequence of OpenCV operations
(resize, rotate, flip, pad, crop) applied with the same parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures_data import write_pascal_tree
from scipy import stats

from benchmarks.loader_vs_official import rotate
from datamodules import PascalFewShot
from datamodules.episode import PLAN_FIELDS, pad_sources, plan_fields, to_model_inputs
from datamodules.protocols import NODUPLICATE_LIST, PROTOCOLS, TRAIN_AUG_LIST, resolve_protocol
from datamodules.transforms import (
    MEAN_FILL,
    EvalTransform,
    TrainTransform,
    render_on_device,
    train_transform,
)

SIZE = 48
DRAWS = 1500


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour content, so that one and two bilinear interpolations agree closely."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def blob_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.ellipse(mask, (width // 3, height // 2), (width // 5, height // 4), 20, 0, 360, 1, -1)
    mask[:, -3:] = 255
    return mask


def pfenet_sequence(image: np.ndarray, mask: np.ndarray, transform: TrainTransform, draw):
    """PFENet's ``RandScale``, ``RandRotate``, ``RandomHorizontalFlip`` and ``Crop`` as OpenCV
    calls in its order, given the draw's parameters (the blur is left out); the rotation is the
    transcription's in :mod:`benchmarks.loader_vs_official`."""
    height, width = mask.shape
    factor = draw.scale * (SIZE / max(height, width) if transform.resize_longer else 1.0)
    image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    if draw.angle:
        image, mask = rotate(image, mask, draw.angle, MEAN_FILL)
    if draw.flip:
        image, mask = cv2.flip(image, 1), cv2.flip(mask, 1)
    h, w = mask.shape
    pad_h, pad_w = max(SIZE - h, 0), max(SIZE - w, 0)
    border = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=MEAN_FILL)
    mask = cv2.copyMakeBorder(mask, *border, cv2.BORDER_CONSTANT, value=255)
    assert mask.shape == draw.canvas
    top, left = draw.offset
    return image[top : top + SIZE, left : left + SIZE], mask[top : top + SIZE, left : left + SIZE]


@pytest.mark.parametrize("resize_longer", [False, True])
@pytest.mark.parametrize("shape", [(150, 200), (200, 150), (30, 40)])
def test_each_draw_equals_pfenets_operations(shape: tuple[int, int], resize_longer: bool) -> None:
    image, mask = smooth_image(*shape), blob_mask(*shape)
    transform = TrainTransform(SIZE, (0.8, 1.25), rotate_p=0.5, resize_longer=resize_longer)
    rotated = unrotated = 0
    for seed in range(40):
        crop, crop_mask, draw = transform.augment(image, mask, np.random.default_rng(seed))
        assert crop.shape == (SIZE, SIZE, 3) and crop_mask.shape == (SIZE, SIZE)
        assert crop.dtype == crop_mask.dtype == np.uint8
        expected, expected_mask = pfenet_sequence(image, mask, transform, draw)
        if draw.blur:
            expected = cv2.GaussianBlur(expected, (5, 5), 0)
        difference = np.abs(crop.astype(int) - expected.astype(int))
        if draw.angle:  # one interpolation instead of two: they differ along edges only
            rotated += 1
            assert np.percentile(difference, 90) <= 3, seed
            assert np.mean(crop_mask != expected_mask) < 0.04, seed
        else:
            unrotated += 1
            assert difference.max() <= (8 if draw.blur else 0)  # blur before or after padding
            assert np.array_equal(crop_mask, expected_mask)
    assert rotated and unrotated


def _draws(transform: TrainTransform, image: np.ndarray, mask: np.ndarray) -> list:
    return [transform.augment(image, mask, np.random.default_rng(seed))[2] for seed in range(DRAWS)]


def _uniform(values: list[float], low: float, high: float) -> None:
    assert low <= min(values) and max(values) <= high
    assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-3


def _bernoulli(flags: list[bool], p: float) -> None:
    assert stats.binomtest(sum(flags), len(flags), p).pvalue > 1e-3


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture tree, its training list also as the pfenet-family presets' list."""
    root = write_pascal_tree(tmp_path_factory.mktemp("pascal"))
    (root / NODUPLICATE_LIST).parent.mkdir(parents=True)
    shutil.copy(root / TRAIN_AUG_LIST, root / NODUPLICATE_LIST)
    return root


@pytest.mark.parametrize("preset", [name for name in PROTOCOLS if PROTOCOLS[name].train_augment])
def test_draw_distributions_follow_each_presets_rule(
    preset: str, pascal_root: Path, tmp_path: Path
) -> None:
    """Scale, angle, blur, flip and crop offset of the datamodule's own training transform."""
    dm = PascalFewShot(root=str(pascal_root), cache_dir=str(tmp_path), protocol=preset,
                       image_size=SIZE, num_workers=0, val_fraction=0.2)  # fmt: skip
    dm.setup("fit")
    transform = dm.train_dataloader().dataset.transform
    rule = resolve_protocol(preset, "pascal", {}, SIZE)
    assert isinstance(transform, TrainTransform)
    assert transform.scale == tuple(rule["train_scale"]) and transform.size == SIZE
    assert (transform.rotate_p, transform.resize_longer) == (
        rule["rotate_p"],
        rule["train_resize_longer"],
    )
    height, width = 60, 80
    empty = np.zeros((height, width), dtype=np.uint8)  # no foreground: the offset is uniform
    draws = _draws(transform, smooth_image(height, width), empty)
    _uniform([d.scale for d in draws], *rule["train_scale"])
    rotated = [d.angle != 0 for d in draws]
    _bernoulli(rotated, rule["rotate_p"])
    _uniform([d.angle for d in draws if d.angle], -10, 10)
    _bernoulli([d.blur for d in draws], 0.5)
    _bernoulli([d.flip for d in draws], 0.5)
    base = SIZE / max(height, width) if rule["train_resize_longer"] else 1.0
    for draw in draws:
        canvas = (round(height * base * draw.scale), round(width * base * draw.scale))
        assert draw.canvas == tuple(max(side, SIZE) for side in canvas)
    jitter = np.random.default_rng(0)
    for axis in (0, 1):  # the offset given the canvas: uniform over its integer range, so
        # (offset + U(0, 1)) / range is U(0, 1)
        ranges = [(d.offset[axis], d.canvas[axis] - SIZE + 1) for d in draws]
        positions = [(o + jitter.random()) / n for o, n in ranges if n > 1]
        assert all(o == 0 for o, n in ranges if n == 1)
        if len(positions) > 100:
            _uniform(positions, 0, 1)
    assert sum(d.canvas[1] > SIZE for d in draws) > DRAWS / 3


def test_crop_keeps_the_foreground_as_pfenets_retries() -> None:
    """PFENet redraws the offset up to 31 times while the crop holds under 85% of the canvas's
    foreground: with an object that most offsets cut, the share of crops keeping 85% rises from
    what uniform offsets give to what 32 tries give."""
    height, width = 40, 200
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[10:30, 20:40] = 1  # near the left edge of a wide canvas: most crops of 48 miss it
    transform = TrainTransform(SIZE, (1.0, 1.0), rotate_p=0.0, resize_longer=False)
    kept = []
    for seed in range(400):
        _, crop_mask, _ = transform.augment(
            smooth_image(height, width), mask, np.random.default_rng(seed)
        )
        kept.append((crop_mask == 1).sum() / (mask == 1).sum())
    offsets = range(width - SIZE + 1)
    keeping = [x for x in offsets if min(40, x + SIZE) - max(20, x) >= 0.85 * 20]
    uniform_p = len(keeping) / len(offsets)
    retried_p = 1 - (1 - uniform_p) ** 32  # the first draw and 31 redraws
    assert uniform_p < 0.2 < 0.99 < retried_p
    _bernoulli([share >= 0.85 for share in kept], retried_p)


def test_hsnet_trains_without_augmentation() -> None:
    rule = resolve_protocol("hsnet", "pascal", {}, SIZE)
    transform = train_transform(SIZE, rule["train_scale"], rule["rotate_p"],
                                rule["train_resize_longer"], rule["train_augment"])  # fmt: skip
    assert isinstance(transform, EvalTransform) and transform.resize == "squash"
    image, mask = smooth_image(60, 80), blob_mask(60, 80)
    first = transform(image, mask, np.random.default_rng(0))
    second = transform(image, mask, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("shape", [(150, 200), (30, 40)])
def test_device_rendering_equals_the_cpu_crops(shape: tuple[int, int]) -> None:
    """``--data.augment_on gpu`` renders the plans the CPU would render: one batched
    ``grid_sample`` against OpenCV's warp or resize, the same fill, rectangle and blur."""
    transform = TrainTransform(SIZE, (0.8, 1.25), rotate_p=0.5, resize_longer=False)
    images = [smooth_image(*shape, seed) for seed in range(24)]
    mask = blob_mask(*shape)
    plans = [transform.plan(mask, np.random.default_rng(seed)) for seed in range(24)]
    expected = np.stack(
        [transform.render(image, plan) for image, plan in zip(images, plans, strict=True)]
    )
    fields = plan_fields("query", images, plans)
    crops = render_on_device(
        pad_sources(fields["query_source"]),
        *[fields[f"query_{name}"] for name in PLAN_FIELDS],
        SIZE,
    )
    difference = (crops.permute(0, 2, 3, 1).numpy() - expected).__abs__()
    assert {p.draw.blur for p in plans} == {True, False}
    assert {bool(p.draw.angle) for p in plans} == {True, False}
    assert difference.max() <= 1  # OpenCV's fixed-point interpolation against float32


def test_device_augmentation_batches_equal_the_cpu_ones(pascal_root: Path, tmp_path: Path) -> None:
    """Same episodes, same draws: the masks are identical and the images agree to rounding."""
    batches = {}
    for where in ("cpu", "gpu"):
        dm = PascalFewShot(root=str(pascal_root), cache_dir=str(tmp_path), protocol="pfenet",
                           image_size=SIZE, shots=2, batch_size=4, num_workers=0,
                           val_fraction=0.3, augment_on=where)  # fmt: skip
        dm.setup("fit")
        batches[where] = to_model_inputs(next(iter(dm.train_dataloader())))
    cpu, gpu = batches["cpu"], batches["gpu"]
    assert set(gpu) == set(cpu)
    for key in ("query_mask", "support_masks", "class_id"):
        assert torch.equal(cpu[key], gpu[key])
    for key in ("query_image", "support_images"):
        assert gpu[key].shape == cpu[key].shape and gpu[key].dtype == torch.float32
        assert (gpu[key] - cpu[key]).abs().mean() < 0.3 / 255 / 0.224
