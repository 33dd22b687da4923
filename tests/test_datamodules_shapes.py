"""The generated ``shapes`` set: classes, determinism, PASCAL layout and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import SHAPE_CLASSES, ShapesFewShot, render_scene
from datamodules.shapes import SHAPES, STYLES, ensure_shapes

NUM_TRAIN, NUM_TEST = 240, 100


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes(root, NUM_TRAIN, NUM_TEST, seed=0)
    return root


def make_dm(root: Path, **kwargs) -> ShapesFewShot:
    settings = {"num_train": NUM_TRAIN, "num_test": NUM_TEST, "num_workers": 0}
    return ShapesFewShot(root=str(root), **settings | kwargs)


def test_classes_are_distinct_combinations() -> None:
    combos = {(cls.shape, cls.style.name) for cls in SHAPE_CLASSES}
    assert len(SHAPE_CLASSES) == len(combos) == len(SHAPES) * len(STYLES) == 20
    for fold in range(4):
        novel = SHAPE_CLASSES[5 * fold : 5 * fold + 5]
        base = [cls for cls in SHAPE_CLASSES if cls not in novel]
        assert {cls.shape for cls in novel} == set(SHAPES)
        assert len({cls.style for cls in novel}) >= 3
        assert {cls.shape for cls in base} == set(SHAPES) and {c.style for c in base} == set(STYLES)


def test_render_scene_is_deterministic_and_labelled() -> None:
    image, label = render_scene(np.random.default_rng(4), 100, 128)
    again, label_again = render_scene(np.random.default_rng(4), 100, 128)
    assert np.array_equal(image, again) and np.array_equal(label, label_again)
    assert image.shape == (100, 128, 3) and image.dtype == np.uint8 and label.shape == (100, 128)
    classes = set(np.unique(label).tolist()) - {0, 255}
    assert 2 <= len(classes) <= 3 and classes <= set(range(1, 21))
    assert (label == 255).any()  # VOC-style borders
    _, one_label = render_scene(np.random.default_rng(0), class_ids=[7])
    assert set(np.unique(one_label).tolist()) == {0, 8, 255}
    assert (one_label == 8).mean() > 0.08  # objects are large


def test_written_in_pascal_layout(shapes_root: Path) -> None:
    folder = ensure_shapes(shapes_root, NUM_TRAIN, NUM_TEST, seed=0)
    train = (folder / "ImageSets/SegmentationAug/train_aug.txt").read_text().split()
    test = (folder / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == NUM_TRAIN and len(test) == NUM_TEST and not set(train) & set(test)
    with Image.open(folder / "SegmentationClassAug" / f"{test[0]}.png") as label:
        assert label.mode == "P"
    with Image.open(folder / "JPEGImages" / f"{test[0]}.jpg") as image:
        assert image.format == "JPEG" and max(image.size) == 128


def test_generation_is_deterministic_and_written_once(shapes_root: Path, tmp_path: Path) -> None:
    folder = ensure_shapes(shapes_root, NUM_TRAIN, NUM_TEST, seed=0)
    label = folder / "SegmentationClassAug" / "train_000003.png"
    mtime = label.stat().st_mtime_ns
    assert ensure_shapes(shapes_root, NUM_TRAIN, NUM_TEST, seed=0) == folder
    assert label.stat().st_mtime_ns == mtime
    other = ensure_shapes(tmp_path, 4, 1, seed=0)
    assert (other / "SegmentationClassAug" / "train_000003.png").read_bytes() == label.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders


def test_loads_through_the_pascal_reader(shapes_root: Path) -> None:
    dm = make_dm(shapes_root, fold=1, val_episodes=8, test_episodes=8, batch_size=8)
    assert dm.min_pixels == 128 and dm.image_size == 96 and dm.class_names[0] == "red circle"
    assert dm.cache_dir == shapes_root / "index"
    dm.setup("fit")
    dm.setup("test")
    assert sorted(dm.pools("test")) == [5, 6, 7, 8, 9]
    train = next(iter(dm.train_dataloader()))
    assert train["query_image"].shape == (8, 3, 96, 96)
    test = next(iter(dm.test_dataloader()[0]))
    assert test["support_images"].shape == (8, 1, 3, 96, 96)
    assert test["query_valid"].max() == 96 and test["query_size"].max() == 128
    assert set(test["class_id"].tolist()) <= {5, 6, 7, 8, 9}
    for batch in (train, test):
        assert torch.isin(batch["query_mask"], torch.tensor([0, 1, 255])).all()
        assert (batch["query_mask"] == 1).flatten(1).any(1).all()  # the class is in every query
