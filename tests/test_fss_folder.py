"""FSS-1000 and your own class folders as few-shot datasets: HSNet's class split, labels from
the masks, the reserved index 254, the samplers and protocols of every dataset, the command
line's fit / test / predict, and bad layouts named before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_archives import object_mask, write_class_folders, write_fss_tree
from PIL import Image

from datamodules import FSS1000, FolderFewShot
from datamodules.folders import RESERVED_NAME, read_binary_mask
from datamodules.lists import FSS_SPLITS, shipped
from datamodules.pascal import save_label_png
from tasks.segment import main

CONFIGS = Path(__file__).parents[1] / "configs" / "segment"
HSNET_SPLITS = {
    s: sorted(line.strip() for line in (shipped(FSS_SPLITS) / f"{s}.txt").read_text().split())
    for s in ("trn", "val", "test")
}
# a small split of real FSS-1000 class names: 6 training, 2 validation, 3 test classes
SMALL_SPLITS = {"trn": HSNET_SPLITS["trn"][:6], "val": HSNET_SPLITS["val"][:2],
                "test": HSNET_SPLITS["test"][:3]}  # fmt: skip
SMALL = ["--data.image_size", "32", "--data.batch_size", "2", "--data.num_workers", "0",
         "--data.val_episodes", "4", "--data.test_episodes", "6", "--data.val_fraction", "0.2",
         "--data.eval_size", "32",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def fss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An FSS-1000 tree of the small split's classes (10 pairs each) and its split lists."""
    base = tmp_path_factory.mktemp("fss")
    splits = base / "splits"
    splits.mkdir()
    for name, classes in SMALL_SPLITS.items():
        (splits / f"{name}.txt").write_text("".join(f"{c}\n" for c in classes))
    root = write_fss_tree(base / "FSS-1000", [c for s in SMALL_SPLITS.values() for c in s])
    return root, splits


def fss_module(fss: tuple[Path, Path], tmp_path: Path, **kwargs) -> FSS1000:
    root, splits = fss
    settings = {"image_size": 32, "batch_size": 2, "num_workers": 0, "val_fraction": 0.2}
    return FSS1000(root=str(root), splits_dir=str(splits), cache_dir=str(tmp_path / "cache"),
                   **settings | kwargs)  # fmt: skip


def test_fss1000_takes_hsnets_class_split_and_order() -> None:
    data = FSS1000(root="/nonexistent")
    ordered = HSNET_SPLITS["trn"] + HSNET_SPLITS["val"] + HSNET_SPLITS["test"]
    assert data.num_classes == 1001 and data.class_names[254] == RESERVED_NAME
    assert [n for n in data.class_names if n != RESERVED_NAME] == ordered
    assert [data.class_names[c] for c in data.base_classes] == HSNET_SPLITS["trn"]
    assert [data.class_names[c] for c in data.novel_classes] == HSNET_SPLITS["test"]
    assert data.class_names[255] == HSNET_SPLITS["trn"][254]
    val = FSS1000(root="/nonexistent", test_split="val")
    assert [val.class_names[c] for c in val.novel_classes] == HSNET_SPLITS["val"]
    assert data.protocol["test_sampling"] == "balanced" and data.protocol["test_episodes"] == 1000
    hsnet = FSS1000(root="/nonexistent", protocol="hsnet")
    assert (hsnet.protocol["test_episodes"], hsnet.protocol["test_sampling"]) == (2400, "pair_walk")
    with pytest.raises(ValueError, match=r"data.protocol='pfenet' has no 'fss' variant"):
        FSS1000(root="/nonexistent", protocol="pfenet")
    with pytest.raises(ValueError, match=r"fold must be one of \[0\], got 1"):
        FSS1000(root="/nonexistent", fold=1)
    with pytest.raises(FileNotFoundError, match=r"dataset root not found: /nonexistent"):
        data.source("train")


def test_fss1000_labels_are_the_thresholded_masks(fss: tuple[Path, Path], tmp_path: Path) -> None:
    data = fss_module(fss, tmp_path)
    source = data.source("test")  # one source of every class; the test episodes draw the novel
    first = SMALL_SPLITS["test"][0]
    assert [i for i in source.ids if i.startswith(f"{first}/")][:3] == [
        f"{first}/{k}" for k in ("1", "10", "2")
    ]
    for c, name in enumerate(SMALL_SPLITS["test"]):
        cls = data.class_names.index(name)
        image, label = source.read(f"{name}/3")
        index = len(SMALL_SPLITS["trn"]) + len(SMALL_SPLITS["val"]) + c  # write_fss_tree's
        expected = (object_mask(index + 3, 24) >= 128) * (cls + 1)
        np.testing.assert_array_equal(label, expected)
        assert image.shape == (24, 24, 3)


def test_fss1000_episodes_under_clean_and_hsnet(fss: tuple[Path, Path], tmp_path: Path) -> None:
    clean = fss_module(fss, tmp_path, test_episodes=6)
    clean.setup("fit")
    clean.setup("test")
    trn, val, test = ({clean.class_names.index(n) for n in SMALL_SPLITS[s]} for s in SMALL_SPLITS)
    assert set(clean.pools("train")) == trn and set(clean.pools("val")) == val  # HSNet's val
    assert all(len(ids) == 10 for pools in ("train", "val") for ids in clean.pools(pools).values())
    held = fss_module(fss, tmp_path, test_split="val")  # validation: held-out trn images
    held.setup("fit")
    assert set(held.pools("train")) == set(held.pools("val")) == trn
    assert all(len(ids) == 8 for ids in held.pools("train").values())  # 2 of 10 held out
    batch = next(iter(clean.test_dataloader()[0]))
    assert set(batch["class_id"].tolist()) <= test
    assert batch["query_image"].shape == (2, 3, 32, 32)
    assert set(batch["query_mask"].unique().tolist()) == {0, 1}
    assert set(batch["support_masks"].unique().tolist()) == {0, 1}
    hsnet = fss_module(fss, tmp_path, protocol="hsnet", test_episodes=31)
    hsnet.setup("test")
    episodes = list(hsnet.sampler("test"))
    queries = [e.query for e in episodes]
    novel = [i for i in hsnet.source("test").ids if i.split("/")[0] in SMALL_SPLITS["test"]]
    assert queries[:30] == novel and queries[30] == queries[0]  # list order
    assert all(e.query.split("/")[0] == s.split("/")[0] for e in episodes for s in e.support)


def test_the_class_at_index_255_is_a_class_not_ignore(tmp_path: Path) -> None:
    """With 256 classes, index 254 is reserved and the 255th folder is index 255, label 256."""
    names = [f"class{i:03d}" for i in range(256)]
    root = write_class_folders(tmp_path / "many", names, per_class=3, size=16)
    data = FolderFewShot(root=str(root), test_classes=[names[254], names[0]], image_size=16,
                         num_workers=0, batch_size=4, test_episodes=8,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert data.num_classes == 257 and data.class_names[254] == RESERVED_NAME
    assert data.class_names[255] == names[254] and 254 not in data.base_classes
    _, label = data.source("test").read(f"{names[254]}/img_0")
    assert label.dtype == np.int32 and set(np.unique(label).tolist()) == {0, 256}
    data.setup("test")
    for batch in data.test_dataloader()[0]:
        for cls, mask in zip(batch["class_id"].tolist(), batch["query_mask"], strict=True):
            assert cls in (0, 255) and set(mask.unique().tolist()) == {0, 1}


def test_folder_splits_by_folds_or_lists(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(8)]
    root = write_class_folders(tmp_path / "own", names)
    novel = {f: FolderFewShot(root=str(root), fold=f).novel_classes for f in range(4)}
    assert novel == {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7]}
    assert FolderFewShot(root=str(root), folds=3, fold=2).novel_classes == [6, 7]
    (root.parent / "test.txt").write_text("c5\r\nc1\r\n")
    listed = FolderFewShot(root=str(root), test_classes=str(root.parent / "test.txt"),
                           train_classes=["c0", "c2", "c3"])  # fmt: skip
    assert listed.novel_classes == [1, 5] and listed.base_classes == [0, 2, 3]
    for kwargs, message in (
        ({"fold": 4}, r"fold must be one of \[0, 1, 2, 3\], got 4"),
        ({"folds": 9}, r"folds must be in 2..8 \(the number of class folders in "),
        ({"test_classes": ["c1", "dog"]}, r"data.test_classes: \['dog'\] are not class folders"),
        ({"test_classes": ["c1"], "train_classes": ["c1", "c2"]}, r"\['c1'\] are in both"),
        ({"test_classes": ["c1"], "fold": 1}, r"fold must be one of \[0\], got 1"),
    ):
        with pytest.raises(ValueError, match=message):
            FolderFewShot(root=str(root), **kwargs)


def test_masks_beside_as_0_1_or_in_a_masks_folder_as_0_255(tmp_path: Path) -> None:
    beside = write_class_folders(tmp_path / "beside", ["a", "b"], per_class=3)
    sibling = write_class_folders(tmp_path / "sibling", ["a", "b"], per_class=3, masks_dir=True)
    labels = []
    for root in (beside, sibling):
        data = FolderFewShot(root=str(root), test_classes=["b"], cache_dir=str(tmp_path / "c"))
        source = data.source("test")  # every class's images; test episodes draw b's
        assert source.ids == [f"{c}/img_{k}" for c in "ab" for k in range(3)]
        labels.append(source.read("b/img_1")[1])
    expected = (object_mask(1 + 1, 24) > 0).astype(np.uint8) * 2  # class b (index 1) -> 2
    np.testing.assert_array_equal(labels[0], expected)
    np.testing.assert_array_equal(labels[1], expected)
    mask = beside / "b" / "img_1.png"  # as a VOC palette PNG of indices 0/1, and as RGB 0/255
    save_label_png((object_mask(2, 24) > 0).astype(np.uint8), mask)
    np.testing.assert_array_equal(read_binary_mask(mask) * 2, expected)
    Image.fromarray(object_mask(2, 24)).convert("RGB").save(mask)
    np.testing.assert_array_equal(read_binary_mask(mask) * 2, expected)


# --- the command line ---------------------------------------------------------------------------


def runs(tmp_path: Path) -> list[str]:
    return ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]


def fit_test_predict(data: list[str], tmp_path: Path, support: Path, mask: Path, queries: Path):
    fit = main(["fit", *data, *SMALL, *runs(tmp_path)])
    assert fit.trainer.global_step == 1 and "val/miou" in fit.trainer.callback_metrics
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    test = main(["test", *data, *SMALL, "--ckpt_path", str(last), *runs(tmp_path)])
    assert 0 <= float(test.trainer.callback_metrics["test/miou"]) <= 1
    output = tmp_path / "predictions"
    main(["predict", *data, *SMALL, "--ckpt_path", str(last), "--data.predict_support",
          f"[{support}]", "--data.predict_support_masks", f"[{mask}]", "--data.predict_queries",
          f"[{queries}]", "--prediction_writer.output_dir", str(output),
          *runs(tmp_path)])  # fmt: skip
    written = sorted(output.glob("*.png"))
    images = sorted(p for p in queries.iterdir() if p.suffix == ".jpg")
    assert [p.stem for p in written] == [p.stem for p in images]
    for path in written:
        assert Image.open(path).size == (24, 24)
    return test


@pytest.mark.parametrize("protocol", ["clean", "hsnet"])
def test_fss1000_fits_tests_and_predicts(
    fss: tuple[Path, Path], tmp_path: Path, protocol: str
) -> None:
    root, splits = fss
    data = ["--data", "datamodules.FSS1000", "--data.root", str(root), "--data.splits_dir",
            str(splits), "--data.cache_dir", str(tmp_path / "cache"), "--data.protocol",
            protocol]  # fmt: skip
    support_class = root / SMALL_SPLITS["test"][0]
    mask = tmp_path / "support.png"  # predict's masks: 255 is ignore, so the object is 1
    Image.fromarray((np.array(Image.open(support_class / "1.png")) // 255).astype(np.uint8)).save(
        mask
    )
    test = fit_test_predict(data, tmp_path, support_class / "1.jpg", mask, root / "queries")
    assert test.datamodule.protocol["name"] == protocol


@pytest.fixture(autouse=True)
def queries(fss: tuple[Path, Path]) -> None:
    """A folder of query images for predict inside the FSS tree (outside any listed class)."""
    root = fss[0] / "queries"
    if not root.is_dir():
        root.mkdir()
        for k in (1, 2):
            shutil.copy(fss[0] / SMALL_SPLITS["test"][1] / f"{k}.jpg", root / f"q{k}.jpg")


def test_folder_fits_tests_and_predicts(tmp_path: Path) -> None:
    names = ["apple", "bolt", "cup", "duck", "egg", "fork", "gear", "hat"]
    root = write_class_folders(tmp_path / "own", names, per_class=6)
    data = ["--data", "datamodules.FolderFewShot", "--data.root", str(root), "--data.fold", "1",
            "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(root / "cup" / "img_0.jpg", queries / "cup0.jpg")
    test = fit_test_predict(data, tmp_path, root / "cup/img_1.jpg", root / "cup/img_1.png", queries)
    assert test.datamodule.novel_classes == [2, 3]  # cup, duck


@pytest.mark.slow
def test_fss1000_config_fits(fss: tuple[Path, Path], tmp_path: Path) -> None:
    """configs/segment/fss1000.yaml (HSNet's recipe) shrunk: no ImageNet file, 64 px."""
    root, splits = fss
    cli = main(["fit", "--config", str(CONFIGS / "fss1000.yaml"), "--data.root", str(root),
                "--data.splits_dir", str(splits), "--data.cache_dir", str(tmp_path / "cache"),
                "--model.backbone.init_args.weights", "null", *SMALL, "--data.image_size", "64",
                "--data.eval_size", "64", *runs(tmp_path)])  # fmt: skip
    assert cli.trainer.global_step == 1


@pytest.mark.slow
def test_fss1000_with_the_shipped_split_on_a_full_tree(tmp_path: Path) -> None:
    """All 1000 class folders (3 pairs each, 16 px): the shipped lists, no splits_dir."""
    root = write_fss_tree(tmp_path / "FSS-1000", sorted(set().union(*HSNET_SPLITS.values())),
                          per_class=3, size=16)  # fmt: skip
    data = ["--data", "datamodules.FSS1000", "--data.root", str(root), "--data.cache_dir",
            str(tmp_path / "cache"), *SMALL, "--data.test_episodes", "240"]  # fmt: skip
    fit = main(["fit", *data, *runs(tmp_path)])
    assert len(fit.datamodule.pools("train")) == 520 and len(fit.datamodule.pools("val")) == 240
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    test = main(["test", *data, "--ckpt_path", str(last), *runs(tmp_path)])
    assert len(test.datamodule.pools("test")) == 240
    assert 0 <= float(test.trainer.callback_metrics["test/miou"]) <= 1


# --- bad layouts --------------------------------------------------------------------------------


def remove_masks(root: Path) -> str:
    for mask in (root / "cup").glob("*.png"):
        mask.unlink()
    return r"mask of image \S+/cup/img_0.jpg not found: \S+/cup/img_0.png"


def remove_one_mask(root: Path) -> str:
    (root / "duck" / "img_3.png").unlink()
    return r"mask of image \S+/duck/img_3.jpg not found: \S+/duck/img_3.png"


def png_image_without_mask(root: Path) -> str:
    Image.new("RGB", (24, 24)).save(root / "egg" / "extra.png")
    return r"mask of image \S+/egg/extra.png not found: \S+/egg/masks/extra.png"


def empty_class(root: Path) -> str:
    for path in (root / "fork").iterdir():
        path.unlink()
    return r"images of the class not found: \S+/fork/<name>.jpg"


@pytest.mark.parametrize(
    "damage", [remove_masks, remove_one_mask, png_image_without_mask, empty_class]
)
def test_bad_folder_layout_fails_before_training(tmp_path: Path, damage) -> None:
    root = write_class_folders(tmp_path / "own", ["apple", "bolt", "cup", "duck", "egg", "fork"])
    message = damage(root)
    with pytest.raises(FileNotFoundError, match=message) as error:
        main(["fit", "--data", "datamodules.FolderFewShot", "--data.root", str(root),
              "--data.test_classes", "[apple, cup, egg, fork, duck]", "--data.cache_dir",
              str(tmp_path / "cache"), *SMALL, *runs(tmp_path)])  # fmt: skip
    assert "Expected layout:" in str(error.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_single_class_folder_is_named_before_training(tmp_path: Path) -> None:
    """One class cannot give both training and test classes: said so, not as a fold range."""
    root = write_class_folders(tmp_path / "own", ["apple"])
    with pytest.raises(ValueError, match=r"own holds one class folder \('apple'\); few-shot"):
        main(["fit", "--data", "datamodules.FolderFewShot", "--data.root", str(root),
              *SMALL, *runs(tmp_path)])  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fss1000_missing_class_folder_fails_before_training(
    fss: tuple[Path, Path], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(fss[0], tmp_path / "FSS-1000"))
    missing = SMALL_SPLITS["trn"][2]
    shutil.rmtree(root / missing)
    message = rf"class folder not found: \S+/{missing}\nExpected layout:\n<root>/<class>/<k>.jpg"
    with pytest.raises(FileNotFoundError, match=message):
        main(["fit", "--data", "datamodules.FSS1000", "--data.root", str(root),
              "--data.splits_dir", str(fss[1]), "--data.cache_dir", str(tmp_path / "cache"),
              *SMALL, *runs(tmp_path)])  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))


# --- mask conventions ---------------------------------------------------------------------------


def test_folder_masks_of_0_k_or_one_colour_give_episodes(tmp_path: Path) -> None:
    """0/2 and red-on-black masks are their object (they were read empty, and the class then
    failed as having too few images); several grey levels below 128 name the mask instead."""
    root = write_class_folders(tmp_path / "own", ["a", "b", "c", "d"], per_class=4)
    masks = sorted((root / "a").glob("*.png"))
    for k, path in enumerate(masks):
        binary = np.array(Image.open(path)).astype(bool)
        red = np.zeros((*binary.shape, 3), dtype=np.uint8)
        red[binary] = (255, 0, 0)
        Image.fromarray(red if k % 2 else binary.astype(np.uint8) * 2).save(path)
    settings = {"test_classes": ["c", "d"], "image_size": 32, "batch_size": 2, "num_workers": 0,
                "val_fraction": 0.5, "min_pixels": 1}  # fmt: skip
    data = FolderFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), **settings)
    data.setup("fit")
    assert sorted(data.pools("train")[0] + data.pools("val")[0]) == [f"a/img_{k}" for k in range(4)]
    expected = (object_mask(0 + 1, 24) > 0).astype(np.uint8)  # class a (index 0) -> 1
    np.testing.assert_array_equal(data.source("train").read("a/img_1")[1], expected)
    Image.fromarray((np.arange(24 * 24) % 3).reshape(24, 24).astype(np.uint8)).save(masks[2])
    again = FolderFewShot(root=str(root), cache_dir=str(tmp_path / "cache2"), **settings)
    message = rf"mask {masks[2]} has values \[0, 1, 2\] \(L read as grayscale\), several below 128"
    with pytest.raises(ValueError, match=message):
        again.setup("fit")
