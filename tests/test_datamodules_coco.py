"""COCO-20i datamodule on a tiny COCO 2014 tree (instances JSON with polygon, RLE and crowd)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import BIG, COCO_CATEGORY_IDS, SMALL, write_coco_tree

from datamodules import CocoFewShot
from datamodules.coco import CocoInstancesSource
from datamodules.pascal import save_label_png

# pycocotools' decode trips a numpy 2 DeprecationWarning on every mask
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_tree(tmp_path_factory.mktemp("coco") / "coco")


def make_dm(root: Path, cache: Path, **kwargs) -> CocoFewShot:
    defaults = {"num_workers": 0, "batch_size": 4, "image_size": 64}
    return CocoFewShot(root=str(root), cache_dir=str(cache), **defaults | kwargs)


def test_polygon_rle_and_crowd_are_rendered(coco_root: Path) -> None:
    source = CocoInstancesSource(
        "coco-test", coco_root / "val2014", coco_root / "annotations/instances_val2014.json"
    )
    label = source.read_label(source.ids[0])
    assert (label[BIG] == 1).all()  # polygon, category id 1 -> class 0
    assert (label[SMALL] == 41).all()  # uncompressed RLE, class 40
    assert (label[:, 86:] == 255).all()  # crowd (compressed RLE) is ignored
    eleventh = source.read_label(source.ids[11])
    assert COCO_CATEGORY_IDS[11] == 13 and (eleventh[BIG] == 12).all()  # ids have gaps
    assert source.class_pixels(source.ids[0]) == {0: 2048, 40: 2048}


@pytest.mark.parametrize("split", ["interleaved", "contiguous"])
@pytest.mark.parametrize("fold", [0, 3])
def test_test_pools_follow_the_split(coco_root: Path, tmp_path: Path, split: str, fold: int):
    dm = make_dm(coco_root, tmp_path, split=split, fold=fold)
    dm.setup("test")
    pools = dm.pools("test")
    expected = range(fold, 80, 4) if split == "interleaved" else range(20 * fold, 20 * fold + 20)
    assert sorted(pools) == list(expected) == dm.novel_classes
    assert all(len(ids) == 2 for ids in pools.values())
    assert len(dm.base_classes) == 60 and not set(dm.base_classes) & set(pools)


def test_pre_rendered_masks_match_the_json(coco_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))
    source = CocoInstancesSource(
        "coco-test", root / "val2014", root / "annotations/instances_val2014.json"
    )
    (root / "masks/val2014").mkdir(parents=True)
    for image_id in source.ids:
        save_label_png(source.read_label(image_id), root / "masks/val2014" / f"{image_id}.png")
    (root / "annotations/instances_val2014.json").unlink()
    from_masks = make_dm(root, tmp_path / "cache", masks="masks")
    from_masks.setup("test")
    from_json = make_dm(coco_root, tmp_path / "cache")
    from_json.setup("test")
    assert from_masks.pools("test") == from_json.pools("test")

    missing = sorted((root / "masks/val2014").glob("*.png"))[-3:]
    for mask in missing:
        mask.unlink()
    with pytest.raises(ValueError, match=r"has masks for 77 of the 80 images .* and 2 more"):
        make_dm(root, tmp_path / "cache2", masks="masks").setup("test")
    partial = make_dm(root, tmp_path / "cache3", masks="masks", masks_partial=True)
    partial.setup("test")
    assert sorted(partial.source("test").ids) == sorted(set(source.ids) - {m.stem for m in missing})


def test_eval_batch(coco_root: Path, tmp_path: Path) -> None:
    dm = make_dm(coco_root, tmp_path, test_episodes=20, batch_size=6, image_size=48)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["query_image"].shape == (6, 3, 48, 48)
    assert batch["support_masks"].shape == (6, 1, 48, 48)
    assert batch["query_label"].shape == (6, 80, 96) and batch["query_label"].dtype == torch.uint8
    assert all(query_id.startswith("COCO_val2014_") for query_id in batch["query_id"])
    assert (batch["query_label"] == 1).sum(dim=(1, 2)).tolist() == [2048] * 6


def _rewrite_json(root: Path, edit) -> Path:
    path = root / "annotations/instances_val2014.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def test_bad_annotations_name_the_file(coco_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))
    path = _rewrite_json(root, lambda c: c["categories"].pop())
    with pytest.raises(ValueError, match="79 categories") as error:
        make_dm(root, tmp_path / "cache").setup("test")
    assert str(path) in str(error.value)

    def unknown_category(content: dict) -> None:
        content["categories"].append({"id": 90, "name": "toothbrush"})  # back to COCO's 80
        content["annotations"][3]["category_id"] = 999

    path = _rewrite_json(root, unknown_category)
    with pytest.raises(ValueError, match="has category 999, not one of") as error:
        make_dm(root, tmp_path / "cache").setup("test")
    assert str(path) in str(error.value)


def test_image_sizes_other_than_the_annotations_are_named(coco_root: Path, tmp_path: Path):
    """A JSON whose image sizes differ from its RLEs' (edited, or of resized images) is an error
    naming the annotation and both sizes, not pycocotools' or NumPy's."""
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))

    def taller(content: dict) -> None:
        for image in content["images"]:
            image["height"] += 10

    path = _rewrite_json(root, taller)
    message = (r"annotation \d+ in .* is \d+x\d+ \(height x width\) but its image "
               r"COCO_val2014_\w+\.jpg is listed as \d+x\d+")  # fmt: skip
    with pytest.raises(ValueError, match=message) as error:
        make_dm(root, tmp_path / "cache").setup("test")
    assert str(path) in str(error.value)


def test_categories_other_than_cocos_80_are_named(coco_root: Path, tmp_path: Path) -> None:
    """80 categories, but not COCO's: every class index and fold would shift silently."""
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))

    def renumbered(content: dict) -> None:
        first, second = content["categories"][:2]
        first["name"], second["name"] = second["name"], first["name"]

    path = _rewrite_json(root, renumbered)
    with pytest.raises(ValueError, match=r"not COCO's 80 .*id 1: 'bicycle' \(expected 'person'\)"):
        make_dm(root, tmp_path / "cache").setup("test")
    assert path.is_file()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read COCO annotations"):
        make_dm(root, tmp_path / "cache").setup("test")


def test_missing_annotations_show_layout(coco_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco_root, tmp_path / "coco"))
    (root / "annotations/instances_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="Expected layout") as error:
        make_dm(root, tmp_path / "cache").setup("test")
    assert "instances_val2014.json" in str(error.value)


def test_split_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        make_dm(tmp_path, tmp_path, split="blocks")


def test_uncompressed_rle_fixture_is_faithful() -> None:
    from fixtures_data import _uncompressed_counts
    from pycocotools import mask as mask_utils

    mask = np.zeros((5, 4), dtype=np.uint8)
    mask[1:3, 1:3] = 1
    rle = mask_utils.frPyObjects({"size": [5, 4], "counts": _uncompressed_counts(mask)}, 5, 4)
    assert np.array_equal(mask_utils.decode(rle), mask)
