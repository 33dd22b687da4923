"""``shapes``: an embedded, generated few-shot segmentation set in the PASCAL-5i layout.

20 classes, each a distinct (shape, style) pair of 5 shapes x 4 styles (a colour with a mild
texture). Class ``5f + j`` (fold ``f``, slot ``j``) is shape ``j`` in style ``(f + j) mod 4``, so
every fold's novel classes mix all five shapes and at least three styles, and every shape and
style also appears among the base classes: a novel class is a new combination, never a new
colour or shape. Scenes hold 2-3 objects of different classes (each 12-28% of the image before
occlusion) over a low-contrast textured background, so the support is needed to know which object
to segment. Labels mark a 2-pixel band around every object with 255, like VOC's borders.

The set is written once, deterministically from ``data_seed``, into
``<root>/v<version>-seed<seed>-<train>-<test>/`` as JPEG images, palette PNG labels and VOC/SBD
list files, and read back through the PASCAL loader (:func:`datamodules.pascal.pascal_source`).
:func:`render_scene` and :data:`SHAPE_CLASSES` are public so other datasets (e.g. classification)
can reuse the generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .bounds import require
from .datamodule import FewShotDataModule
from .dataset import SegmentationDataset, Split, TaskDefaults
from .files import data_dir, write_once
from .pascal import VAL_LIST, pascal_source, save_label_png
from .protocols import TRAIN_AUG_LIST
from .source import IGNORE, PngLabelSource
from .splits import pascal_novel_classes

GENERATOR_VERSION = 1
TRAIN_LIST = TRAIN_AUG_LIST
TEST_LIST = VAL_LIST
SHAPES = ("circle", "square", "triangle", "star", "cross")


@dataclass(frozen=True)
class Style:
    """An object appearance: base colour and a mild brightness texture."""

    name: str
    colour: tuple[int, int, int]
    texture: str  # "solid" | "stripes" | "dots" | "checker"


STYLES = (
    Style("red", (215, 45, 40), "solid"),
    Style("green", (40, 165, 60), "stripes"),
    Style("blue", (45, 85, 220), "dots"),
    Style("yellow", (235, 195, 35), "checker"),
)


@dataclass(frozen=True)
class ShapeClass:
    """One class: a shape drawn in a style."""

    shape: str
    style: Style

    @property
    def name(self) -> str:
        return f"{self.style.name} {self.shape}"


SHAPE_CLASSES = tuple(
    ShapeClass(SHAPES[slot], STYLES[(fold + slot) % len(STYLES)])
    for fold in range(4)
    for slot in range(len(SHAPES))
)

SHAPE_CLASS_NAMES = [cls.name for cls in SHAPE_CLASSES]


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices ``[N, 2]`` (x, y) of ``shape`` inscribed in the unit circle."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.ones_like(angles)
    elif shape in ("square", "triangle"):
        sides = 4 if shape == "square" else 3
        angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) + np.pi / sides
        radii = np.ones_like(angles)
    elif shape == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.tile([1.0, 0.45], 5)
    else:  # cross: a plus sign with arms of half-width 0.33
        w = 0.33
        return np.array(
            [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
             (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        )  # fmt: skip
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


_UNIT = {shape: _unit_polygon(shape) for shape in SHAPES}
_UNIT_AREA = {shape: _polygon_area(points) for shape, points in _UNIT.items()}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Desaturated base colour, low-frequency blotches and faint stripes."""
    base = rng.uniform(80, 180) + rng.uniform(-12, 12, size=3)
    coarse = np.clip(128 + rng.normal(0, 16, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)) - 128.0
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    phase = 2 * np.pi / period
    stripes = 6 * np.sin(
        phase * np.cos(theta) * np.arange(width)[None, :]
        + phase * np.sin(theta) * np.arange(height)[:, None]
    )
    return (base + blotches + stripes[..., None]).astype(np.float32)


def _appearance(
    rng: np.random.Generator, style: Style, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Colours ``[N, 3]`` of ``style`` at pixels ``(ys, xs)``: jittered colour times a mild
    texture (+-15-25% brightness)."""
    colour = np.clip(np.array(style.colour) + rng.normal(0, 10, size=3), 0, 255)
    if style.texture == "stripes":
        theta = rng.uniform(0, np.pi)
        gain = 1 + 0.15 * np.sign(np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / 8))
    elif style.texture == "dots":
        dx, dy = (xs + rng.uniform(0, 8)) % 8 - 4, (ys + rng.uniform(0, 8)) % 8 - 4
        gain = 1 - 0.25 * (dx**2 + dy**2 < 5)
    elif style.texture == "checker":
        gain = 1 + 0.15 * (((xs // 6 + ys // 6) % 2) * 2 - 1)
    else:
        gain = np.ones(len(xs))
    return gain[:, None] * colour


def _place(
    rng: np.random.Generator,
    radius: float,
    placed: list[tuple[float, float, float]],
    h: int,
    w: int,
) -> tuple[float, float]:
    """A centre that keeps objects mostly apart: best of 30 draws by centre distance / radii."""
    best, best_score = (w / 2, h / 2), -1.0
    for _ in range(30):
        x, y = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        score = min(
            (math.hypot(x - px, y - py) / (radius + pr) for px, py, pr in placed), default=9
        )
        if score >= 0.85:
            return x, y
        if score > best_score:
            best, best_score = (x, y), score
    return best


def render_scene(
    rng: np.random.Generator,
    height: int = 128,
    width: int = 128,
    class_ids: Sequence[int] | None = None,
    area: tuple[float, float] = (0.12, 0.28),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: image ``uint8 [H, W, 3]`` and label ``uint8 [H, W]``.

    Args:
        rng: the only source of randomness, so a scene is fixed by its generator state.
        height: image height.
        width: image width.
        class_ids: 0-based classes of :data:`SHAPE_CLASSES` to draw, back to front; ``None``
            draws 2 or 3 distinct random classes.
        area: range of each object's area as a fraction of the image (before occlusion).

    Returns:
        The image and its label: ``c + 1`` for class ``c``, 0 background, 255 on a 2-pixel band
        along every boundary (VOC style).
    """
    if class_ids is None:
        class_ids = rng.choice(
            len(SHAPE_CLASSES), size=rng.choice([2, 3], p=[0.6, 0.4]), replace=False
        )
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    placed: list[tuple[float, float, float]] = []
    for class_id in class_ids:
        cls = SHAPE_CLASSES[int(class_id)]
        radius = math.sqrt(rng.uniform(*area) * height * width / _UNIT_AREA[cls.shape])
        x, y = _place(rng, radius, placed, height, width)
        placed.append((x, y, radius))
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = _UNIT[cls.shape] @ rotation.T * radius + (x, y)
        canvas = Image.new("L", (width, height))
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
        ys, xs = np.nonzero(np.asarray(canvas))
        image[ys, xs] = _appearance(rng, cls.style, ys, xs)
        label[ys, xs] = int(class_id) + 1
    edges = np.zeros_like(label, dtype=bool)
    across, down = label[:, 1:] != label[:, :-1], label[1:] != label[:-1]
    edges[:, 1:] |= across
    edges[:, :-1] |= across
    edges[1:] |= down
    edges[:-1] |= down
    label[edges] = IGNORE
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0))  # soft edges, like a photo
    image += 5 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_shapes(folder: Path, num_train: int, num_test: int, seed: int) -> None:
    """Write the set into ``folder`` in the PASCAL layout (``datamodules.pascal.PASCAL_LAYOUT``).

    Image ``i`` of split ``s`` depends only on ``(seed, s, i)``. Sizes vary like VOC's: the longer
    side is 128, the shorter 96-128, 70% landscape.
    """
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/SegmentationAug",
                "ImageSets/Segmentation"):  # fmt: skip
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for code, (split, count, list_file) in enumerate(
        (("train", num_train, TRAIN_LIST), ("val", num_test, TEST_LIST))
    ):
        ids = [f"{split}_{index:06d}" for index in range(count)]
        for index, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, code, index])
            short = int(rng.integers(96, 129))
            height, width = (short, 128) if rng.random() < 0.7 else (128, short)
            image, label = render_scene(rng, height, width)
            Image.fromarray(image).save(folder / "JPEGImages" / f"{image_id}.jpg", quality=90)
            save_label_png(label, folder / "SegmentationClassAug" / f"{image_id}.png")
        (folder / list_file).write_text("".join(f"{image_id}\n" for image_id in ids))


def ensure_shapes(root: Path, num_train: int, num_test: int, seed: int) -> Path:
    """The generated set's folder under ``root``, written first if missing.

    Written into a temporary folder and renamed at the end, so concurrent processes and
    interrupted runs never leave a partial set behind.
    """
    folder = root / f"v{GENERATOR_VERSION}-seed{seed}-{num_train}-{num_test}"
    return write_once(folder, lambda tmp: write_shapes(tmp, num_train, num_test, seed))


class ShapesDataset(SegmentationDataset):
    """The generated ``shapes`` set, read as PASCAL-5i (20 classes in 4 folds of 5).

    Its defaults are sized for a fast CPU run. Few-shot: 96 px, batch 8, 2 workers, 300
    validation episodes, epochs of 2000 training episodes (the set is large and one pass over
    it is not an epoch); ``min_pixels = 128`` is OSLSM's 2 * 32 * 32 scaled by the image area
    (128 px here vs 500 px for VOC: (128 / 512)^2 * 2048 = 128). Semantic: 64 px crops of the
    96-128 px images at scale 0.75-1.5 (BAM's 0.5 leaves small images mostly padding),
    evaluation at the images' own 128 px, batch 8, 2 workers.

    Args:
        root: cache folder holding generated sets and their class index; ``None`` =
            ``data_dir()/shapes`` (``$FEWSHOT_DATA_DIR/shapes`` or
            ``~/.cache/fewshot-dilated/shapes``).
        num_train: images in the training list.
        num_test: images in the test list.
        data_seed: seed of the generator (the episode seed is the datamodule's ``seed``).
    """

    class_names = SHAPE_CLASS_NAMES
    defaults: ClassVar[TaskDefaults] = {
        "few_shot": {
            "image_size": 96,
            "batch_size": 8,
            "num_workers": 2,
            "train_episodes": 2000,
            "val_episodes": 300,
            "min_pixels": 128,
        },
        "semantic": {
            "image_size": 64,
            "eval_size": 128,
            "train_scale": (0.75, 1.5),
            "batch_size": 8,
            "num_workers": 2,
        },
    }

    def __init__(
        self,
        root: str | None = None,
        num_train: int = 2500,
        num_test: int = 500,
        data_seed: int = 0,
    ) -> None:
        require("num_train", num_train, num_train >= 1, "an integer >= 1")
        require("num_test", num_test, num_test >= 1, "an integer >= 1")
        super().__init__(root)
        self.num_train, self.num_test, self.data_seed = num_train, num_test, data_seed

    def default_root(self) -> Path:
        return data_dir() / "shapes"

    def default_cache_dir(self) -> Path:
        """Next to the generated sets, so a ``root`` holds everything shapes writes."""
        return self.root / "index"

    @property
    def data_folder(self) -> Path:
        """The generated set in PASCAL layout (written on first use)."""
        return ensure_shapes(self.root, self.num_train, self.num_test, self.data_seed)

    def prepare(self) -> None:
        ensure_shapes(self.root, self.num_train, self.num_test, self.data_seed)

    def fold_novel_classes(self, fold: int) -> list[int]:
        return pascal_novel_classes(fold)

    def make_source(self, split: Split) -> PngLabelSource:
        list_file = TRAIN_LIST if split == "train" else TEST_LIST
        return pascal_source(
            self.data_folder, list_file, f"shapes-{split}", num_classes=self.num_classes
        )


class ShapesFewShot(FewShotDataModule):
    """Few-shot episodes on the generated ``shapes`` set: :class:`FewShotDataModule` of a
    :class:`ShapesDataset` (its defaults), under the class path configs and checkpoints record.

    Args:
        root: see :class:`ShapesDataset`.
        num_train: see :class:`ShapesDataset`.
        num_test: see :class:`ShapesDataset`.
        data_seed: see :class:`ShapesDataset`.
        **kwargs: see :class:`FewShotDataModule`.
    """

    #: the dataset bound (what a checkpoint's data setting naming this class means)
    dataset_class = ShapesDataset

    def __init__(
        self,
        root: str | None = None,
        num_train: int = 2500,
        num_test: int = 500,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.dataset_class(root, num_train, num_test, data_seed), **kwargs)
