"""PASCAL-5i datamodule, episodes, splits, cache and bad input, on a tiny tree in VOC format."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import HEIGHT, WIDTH, pascal_label
from lightning import Trainer
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image
from torch.utils.data import DistributedSampler

from datamodules import EpisodeSampler, PascalFewShot
from datamodules.episode import to_model_inputs
from datamodules.index import index_path
from datamodules.pascal import save_label_png
from datamodules.predict import support_mask
from datamodules.splits import coco_novel_classes, pascal_novel_classes
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_FILL


@pytest.fixture
def make_dm(pascal_root: Path, tmp_path: Path):
    """A datamodule factory on the shared tree, with a per-test index cache."""

    def make(root: Path = pascal_root, **kwargs) -> PascalFewShot:
        defaults = {"num_workers": 0, "batch_size": 4, "image_size": 64, "val_fraction": 0.2}
        return PascalFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), **defaults | kwargs)

    return make


@pytest.fixture
def own_tree(pascal_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tree that a test may damage."""
    return Path(shutil.copytree(pascal_root, tmp_path / "VOC2012"))


# Published fold definitions --------------------------------------------------------------------


@pytest.mark.parametrize("fold", range(4))
def test_pascal_folds_are_oslsm(fold: int) -> None:
    one_based = [c + 1 for c in pascal_novel_classes(fold)]
    assert one_based == list(range(5 * fold + 1, 5 * fold + 6))


@pytest.mark.parametrize("fold", range(4))
def test_coco_folds(fold: int) -> None:
    interleaved = [c + 1 for c in coco_novel_classes(fold, "interleaved")]
    assert interleaved == [fold + 1 + 4 * k for k in range(20)]  # i+1, i+5, ..., i+77
    assert interleaved[-1] == fold + 77
    contiguous = [c + 1 for c in coco_novel_classes(fold, "contiguous")]
    assert contiguous == list(range(20 * fold + 1, 20 * fold + 21))


def test_folds_partition_the_classes() -> None:
    for novel in (pascal_novel_classes, lambda f: coco_novel_classes(f, "interleaved")):
        classes = sorted(c for fold in range(4) for c in novel(fold))
        assert classes == list(range(len(classes)))


def test_base_and_novel_attributes(make_dm) -> None:
    dm = make_dm(fold=2)
    assert dm.num_classes == 20 and len(dm.class_names) == 20
    assert dm.novel_classes == [10, 11, 12, 13, 14]
    assert dm.class_names[dm.novel_classes[0]] == "diningtable"  # VOC class 11
    assert sorted(dm.base_classes + dm.novel_classes) == list(range(20))


# Pools: min_pixels, splits, BAM option ---------------------------------------------------------


def test_min_pixels_rule(make_dm) -> None:
    dm = make_dm()
    dm.setup("test")
    pools = dm.pools("test")
    # test image j: big class j % 20 (2048 px, kept), small (j + 3) % 20 (2047 px, dropped)
    for cls, ids in pools.items():
        assert ids == [f"2008_test{j:04d}" for j in range(40) if j % 20 == cls]
    loose = make_dm(min_pixels=2047)
    loose.setup("test")
    for cls, ids in loose.pools("test").items():
        assert ids == [f"2008_test{j:04d}" for j in range(40) if cls in (j % 20, (j + 3) % 20)]


def test_validation_is_base_classes_on_held_out_images(make_dm) -> None:
    dm = make_dm(fold=1)
    dm.setup("fit")
    train, val = dm.pools("train"), dm.pools("val")
    assert set(train) == set(val) == set(dm.base_classes)
    assert not set(val) & set(dm.novel_classes)
    train_ids = {i for ids in train.values() for i in ids}
    val_ids = {i for ids in val.values() for i in ids}
    assert train_ids and val_ids and not train_ids & val_ids
    for cls in dm.base_classes:  # ceil(0.2 * 10) = 2 held out per class
        assert len(val[cls]) == 2 and len(train[cls]) == 8
    episodes = dm.sampler("val").episodes()
    assert {e.class_id for e in episodes} <= set(dm.base_classes)
    # the held-out split does not depend on the fold: no fold trains on these images
    other = make_dm(fold=3)
    other.setup("fit")
    assert not val_ids & {i for ids in other.pools("train").values() for i in ids}


def test_exclude_novel_from_train(make_dm) -> None:
    dm = make_dm(fold=0, exclude_novel_from_train=True)
    dm.setup("fit")
    counts = dm.counts("train")
    kept = {i for ids in dm.pools("train").values() for i in ids}
    assert all(not set(counts[i]) & set(dm.novel_classes) for i in kept)
    plain = make_dm(fold=0)
    plain.setup("fit")
    assert kept < {i for ids in plain.pools("train").values() for i in ids}


# Episodes: determinism, sharding, support != query --------------------------------------------


def test_eval_episodes_are_fixed_by_seed(make_dm) -> None:
    first, second = make_dm(test_episodes=30), make_dm(test_episodes=30)
    first.setup("test")
    second.setup("test")
    assert first.sampler("test").episodes() == second.sampler("test").episodes()
    assert list(first.sampler("test")) == first.sampler("test").episodes()
    other = make_dm(test_episodes=30, test_seeds=[5])
    other.setup("test")
    assert other.sampler("test").episodes() != first.sampler("test").episodes()


def test_support_never_contains_query() -> None:
    pools = {c: [f"{c}-{i}" for i in range(c % 4 + 3)] for c in range(6)}
    for shots in (1, 2):
        for train in (False, True):
            sampler = EpisodeSampler(pools, 500, shots, (1,), train=train)
            for episode in sampler:
                assert episode.query not in episode.support
                assert len(set(episode.support)) == shots
                assert {episode.query, *episode.support} <= set(pools[episode.class_id])


def test_every_query_pair_is_visited() -> None:
    pools = {0: ["a", "b", "c"], 1: ["a", "d"]}
    episodes = EpisodeSampler(pools, 5, 1, (0,)).episodes()
    assert sorted((e.class_id, e.query) for e in episodes) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "d")
    ]  # fmt: skip


@pytest.mark.parametrize("train", [False, True])
def test_ranks_are_disjoint_and_cover(train: bool) -> None:
    pools = {c: [f"{c}-{i}" for i in range(5)] for c in range(4)}
    world = 3
    full = EpisodeSampler(pools, 100, 2, (7,), train=train).episodes()
    shards = [
        list(EpisodeSampler(pools, 100, 2, (7,), r, world, train=train)) for r in range(world)
    ]
    flat = [e for shard in shards for e in shard]
    if train:  # cut to equal lengths so that DDP ranks step together
        assert [len(s) for s in shards] == [33, 33, 33]
        assert sorted(map(repr, flat)) == sorted(map(repr, full[:99]))
    else:  # every episode exactly once, no padding
        assert [len(s) for s in shards] == [34, 33, 33]
        assert sorted(map(repr, flat)) == sorted(map(repr, full))
    assert [len(EpisodeSampler(pools, 100, 2, (7,), r, world, train=train)) for r in range(3)] == [
        len(s) for s in shards
    ]


def test_training_episodes_change_every_epoch() -> None:
    pools = {c: [f"{c}-{i}" for i in range(6)] for c in range(3)}
    sampler = EpisodeSampler(pools, 18, 1, (3,), train=True)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_training_seed_comes_from_lightning_seeding(make_dm) -> None:
    from lightning import seed_everything

    dm = make_dm(train_episodes=12)
    dm.setup("fit")
    seed_everything(11)
    first = dm.sampler("train").episodes()
    seed_everything(11)
    assert dm.sampler("train").episodes() == first
    seed_everything(12)
    assert dm.sampler("train").episodes() != first
    assert len(first) == 12


def test_workers_do_not_change_test_batches(make_dm) -> None:
    batches = {}
    for workers in (0, 2):
        dm = make_dm(test_episodes=10, num_workers=workers)
        dm.setup("test")
        batches[workers] = list(dm.test_dataloader()[0])
    for one, two in zip(batches[0], batches[2], strict=True):
        assert one["query_id"] == two["query_id"]
        for key in ("query_image", "support_masks", "class_id", "query_label", "query_valid"):
            assert torch.equal(one[key], two[key])


def test_lightning_keeps_the_episode_samplers(make_dm) -> None:
    """Lightning replaces a loader's sampler under DDP unless it is a DistributedSampler (its
    ``_requires_distributed_sampler``, private: pinned here so that an upgrade fails loudly)."""
    dm = make_dm(test_episodes=9)
    dm.setup("test")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    dm.trainer = trainer
    (loader,) = dm.test_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (0, 2, 5)
    assert trainer._accelerator_connector.use_distributed_sampler
    prepared = trainer._data_connector._prepare_dataloader(loader, False, RunningStage.TESTING)
    assert prepared.sampler is sampler


# Batches: the contract -------------------------------------------------------------------------


def _check_common(batch: dict, size: int, shots: int) -> None:
    """The loader's uint8 contract, then what :func:`to_model_inputs` makes of it."""
    b = batch["query_image"].shape[0]
    assert batch["query_image"].shape == (b, 3, size, size)
    assert batch["support_images"].shape == (b, shots, 3, size, size)
    assert batch["query_mask"].shape == (b, size, size)
    assert batch["support_masks"].shape == (b, shots, size, size)
    for key in ("query_image", "support_images", "query_mask", "support_masks"):
        assert batch[key].dtype == torch.uint8, key
    assert batch["class_id"].shape == (b,) and batch["class_id"].dtype == torch.long
    for key in ("query_mask", "support_masks"):
        assert set(batch[key].unique().tolist()) <= {0, 1, 255}
        assert (batch[key] == 1).any()
    model = to_model_inputs(batch)
    for key in ("query_image", "support_images"):
        assert model[key].dtype == torch.float32
        expected = (batch[key] / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
            IMAGENET_STD
        )[:, None, None]
        torch.testing.assert_close(model[key], expected)
    for key in ("query_mask", "support_masks"):
        assert model[key].dtype == torch.long and torch.equal(model[key], batch[key].long())


def test_train_batch_contract(make_dm) -> None:
    dm = make_dm(shots=2, train_episodes=8, val_fraction=0.3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    _check_common(batch, 64, 2)
    assert "query_label" not in batch


def test_eval_batch_contract(make_dm) -> None:
    dm = make_dm(test_episodes=5, batch_size=4, image_size=48)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    _check_common(batch, 48, 1)
    assert batch["query_label"].shape == (4, HEIGHT, WIDTH)
    assert batch["query_size"].tolist() == [[HEIGHT, WIDTH]] * 4
    assert batch["query_valid"].tolist() == [[40, 48]] * 4  # longer side 96 -> 48
    assert batch["query_mask"][:, 40:].eq(255).all()  # padding below the image is ignored
    fill = torch.tensor(MEAN_FILL, dtype=torch.uint8)[:, None, None]
    assert batch["query_image"][:, :, 40:].eq(fill).all()  # the mean colour
    for label, query_id, class_id in zip(
        batch["query_label"], batch["query_id"], batch["class_id"], strict=True
    ):
        raw = np.array(Image.open(dm.root / "SegmentationClassAug" / f"{query_id}.png"))
        expected = np.where(raw == 255, 255, (raw == int(class_id) + 1).astype(np.int64))
        assert np.array_equal(label.numpy(), expected)
        assert label.eq(1).sum() == 2048


def test_query_label_padding_to_batch_max(own_tree: Path, make_dm) -> None:
    # make one test image (and label) smaller: the batch pads its label with 255
    image_id = "2008_test0000"
    Image.open(own_tree / "JPEGImages" / f"{image_id}.jpg").crop((0, 0, 90, 60)).save(
        own_tree / "JPEGImages" / f"{image_id}.jpg"
    )
    save_label_png(
        pascal_label(1, 4)[:60, :90], own_tree / "SegmentationClassAug" / f"{image_id}.png"
    )
    dm = make_dm(own_tree, test_episodes=40, batch_size=40, image_size=48)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    row = batch["query_id"].index(image_id)
    assert batch["query_size"][row].tolist() == [60, 90]
    assert batch["query_valid"][row].tolist() == [32, 48]
    assert batch["query_label"].shape == (40, HEIGHT, WIDTH)
    assert (
        batch["query_label"][row, 60:].eq(255).all()
        and batch["query_label"][row, :, 90:].eq(255).all()
    )


# Class index cache -----------------------------------------------------------------------------


def test_index_cache_is_reused_and_keyed_by_the_files(own_tree: Path, make_dm) -> None:
    dm = make_dm(own_tree)
    dm.setup("test")
    cache = index_path(dm.source("test"), dm.cache_dir)
    assert cache.is_file()
    # Damage a label but keep its size and mtime: a second setup must not re-read it.
    label = own_tree / "SegmentationClassAug" / "2008_test0005.png"
    stat = label.stat()
    label.write_bytes(b"\0" * stat.st_size)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = make_dm(own_tree)
    again.setup("test")
    assert again.pools("test") == dm.pools("test")
    # A changed file changes the key: the index is rebuilt and finds the damage.
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(ValueError, match=r"2008_test0005\.png"):
        make_dm(own_tree).setup("test")


def test_a_damaged_index_cache_is_rebuilt(
    own_tree: Path, make_dm, caplog: pytest.LogCaptureFixture
) -> None:
    dm = make_dm(own_tree)
    dm.setup("test")
    cache = index_path(dm.source("test"), dm.cache_dir)
    cache.write_text(cache.read_text()[:40])  # a truncated copy
    again = make_dm(own_tree)
    with caplog.at_level("WARNING"):
        again.setup("test")
    assert again.pools("test") == dm.pools("test")
    assert "is damaged" in caplog.text and str(cache) in caplog.text
    assert json.loads(cache.read_text())  # whole again


# Bad input -------------------------------------------------------------------------------------


def test_missing_root_shows_layout(tmp_path: Path, make_dm) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="Expected layout") as error:
        make_dm(missing).setup("test")
    assert str(missing) in str(error.value) and "SegmentationClassAug/<id>.png" in str(error.value)


@pytest.mark.parametrize(
    "relative", ["SegmentationClassAug", "JPEGImages", "ImageSets/Segmentation/val.txt"]
)
def test_missing_folder_or_list_names_it(own_tree: Path, make_dm, relative: str) -> None:
    path = own_tree / relative
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError, match="Expected layout") as error:
        make_dm(own_tree).setup("test")
    assert str(path) in str(error.value)


def test_missing_listed_file_names_it(own_tree: Path, make_dm) -> None:
    (own_tree / "JPEGImages" / "2008_test0003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2008_test0003\.jpg"):
        make_dm(own_tree).setup("test")


def _damage(tree: Path, kind: str) -> Path:
    image = tree / "JPEGImages" / "2008_test0007.jpg"
    label = tree / "SegmentationClassAug" / "2008_test0007.png"
    if kind == "corrupt image":
        image.write_bytes(b"not a jpeg")
        return image
    if kind == "corrupt label":
        label.write_bytes(b"\x89PNG garbage")
        return label
    if kind == "rgb label":
        Image.new("RGB", (WIDTH, HEIGHT)).save(label)
        return label
    if kind == "size mismatch":
        save_label_png(pascal_label(8, 3)[:, :90], label)
        return label
    bad = pascal_label(8, 3)
    bad[0, 0] = 21
    save_label_png(bad, label)
    return label


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt image", "cannot read image"),
        ("corrupt label", "cannot read label"),
        ("rgb label", "palette"),
        ("size mismatch", "size mismatch"),
        ("bad values", r"values \[21\] that are not classes"),
    ],
)
def test_bad_files_are_named_at_setup(own_tree: Path, make_dm, kind: str, message: str) -> None:
    path = _damage(own_tree, kind)
    with pytest.raises(ValueError, match=message) as error:
        make_dm(own_tree).setup("test")
    assert str(path) in str(error.value)


def test_truncated_image_is_named_when_loaded(own_tree: Path, make_dm) -> None:
    dm = make_dm(own_tree)
    dm.setup("test")  # the header is intact, so indexing succeeds
    image = own_tree / "JPEGImages" / "2008_test0002.jpg"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"2008_test0002\.jpg"):
        dm.source("test").read("2008_test0002")


def test_too_few_images_for_the_shots(make_dm) -> None:
    dm = make_dm(shots=2)  # every novel class has 2 eligible test images; 2-shot needs 3
    with pytest.raises(ValueError, match=r"need at least 3 images") as error:
        dm.setup("test")
    assert "'aeroplane' (class 0): 2" in str(error.value) and "test split" in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fold", 4, r"fold must be one of \[0, 1, 2, 3\], got 4"),
        ("fold", -1, r"fold must be one of \[0, 1, 2, 3\], got -1"),
        ("shots", 0, "shots=0: input should be greater than 0"),
        ("val_fraction", 1.0, "val_fraction=1.0: input should be less than 1"),
        ("min_pixels", 0, "min_pixels=0: input should be greater than 0"),
        ("test_episodes", 0, "test_episodes=0: input should be greater than 0"),
        ("eval_size", 2, "eval_size=2: input should be greater than or equal to 8"),
        ("rotate_p", 1.5, "rotate_p=1.5: input should be less than or equal to 1"),
    ],
)
def test_bad_arguments(make_dm, field: str, value: object, message: str) -> None:
    """The ranges of the signature's annotations (what the command line checks at parse time)
    hold for Python callers too."""
    with pytest.raises(ValueError, match=message):
        make_dm(**{field: value})


def test_configurable_from_lightning_cli(pascal_root: Path, tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    from datamodules import FewShotDataModule

    init_args = {"root": str(pascal_root), "fold": 3, "shots": 5, "cache_dir": str(tmp_path)}
    data = {"class_path": "datamodules.PascalFewShot", "init_args": init_args}
    cli = LightningCLI(
        datamodule_class=FewShotDataModule, subclass_mode_data=True, run=False,
        args={"model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
              "data": data, "trainer": {"logger": False}},
    )  # fmt: skip
    assert isinstance(cli.datamodule, PascalFewShot)
    assert (cli.datamodule.fold, cli.datamodule.shots) == (3, 5)
    assert cli.datamodule.novel_classes == [15, 16, 17, 18, 19]


def test_file_that_disappears_mid_run_is_named_from_a_worker(own_tree: Path, make_dm) -> None:
    """Deleted after the index was built, read in a loader worker: the error names the file."""
    dm = make_dm(own_tree, num_workers=2, test_episodes=8)
    dm.setup("test")
    first = dm.test_dataloader()[0].sampler.episodes()[0].query
    (image,) = (own_tree / "JPEGImages").glob(f"{first}.jpg")
    image.unlink()
    with pytest.raises(ValueError, match=rf"cannot read image {re.escape(str(image))}"):
        list(dm.test_dataloader()[0])


@pytest.mark.parametrize(
    ("values", "expected"),
    [((0, 255), (0, 1)), ((0, 1, 255), (0, 1, 255)), ((0, 15, 255), (0, 1, 255))],
    ids=["0/255 mask", "0/1 with ignore", "VOC class with border"],
)
def test_predict_support_masks_read_255_as_object_only_alone(
    tmp_path: Path, values: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    """Support masks: 255 is ignore beside other object values, the object in a 0/255 mask."""
    label = np.zeros((8, 9), dtype=np.uint8)
    for column, value in enumerate(values):
        label[:, 3 * column : 3 * column + 3] = value
    path = tmp_path / "mask.png"
    Image.fromarray(label).save(path)
    binary = support_mask(path, (8, 9), tmp_path / "image.jpg")
    assert [int(binary[0, 3 * column]) for column in range(len(values))] == list(expected)


def test_16_bit_images_read_as_their_8_bit_values(tmp_path: Path) -> None:
    """A 16-bit PNG decodes to its high bytes (Pillow's RGB conversion made it pure white)."""
    import cv2

    from datamodules.source import open_image

    pixels = np.zeros((4, 5, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 1000, 30000, 65535  # B, G, R for OpenCV
    cv2.imwrite(str(tmp_path / "deep.png"), pixels)
    image = open_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert image[0, 0].tolist() == [255, 30000 >> 8, 1000 >> 8]  # RGB


def test_list_files_written_with_a_byte_order_mark_read_the_same(own_tree: Path) -> None:
    """Windows editors save UTF-8 with a BOM: the first id must not become '\\ufeff2008_...'."""
    from datamodules.pascal import pascal_source

    val = own_tree / "ImageSets/Segmentation/val.txt"
    plain = pascal_source(own_tree, "ImageSets/Segmentation/val.txt", "pascal-test").ids
    val.write_bytes(b"\xef\xbb\xbf" + val.read_bytes())
    assert pascal_source(own_tree, "ImageSets/Segmentation/val.txt", "pascal-test").ids == plain


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_label_values_above_the_classes_are_refused_in_any_width(dtype: type) -> None:
    """uint8 maps go through OpenCV's range check, wider ones (over 254 classes) through NumPy;
    both refuse a value above the classes and accept 255."""
    from datamodules.source import IGNORE, SegmentationSource

    class Fixed(SegmentationSource):
        def __init__(self, label: np.ndarray, num_classes: int) -> None:
            super().__init__("fixed", num_classes)
            self.label = label

        @property
        def ids(self) -> list[str]:
            return ["only"]

        def image_path(self, image_id: str) -> Path:
            return Path("only.jpg")

        def label_origin(self, image_id: str) -> str:
            return "fixed.png"

        def _decode_label(self, image_id: str) -> np.ndarray:
            return self.label

        def fingerprint(self) -> str:
            return "fixed"

    classes = 20 if dtype is np.uint8 else 1000
    label = np.zeros((4, 5), dtype=dtype)
    label[0, :2] = classes, IGNORE
    assert Fixed(label, classes).read_label("only") is label
    label[1, 1] = classes + 1
    with pytest.raises(ValueError, match=rf"fixed\.png has values \[{classes + 1}\]"):
        Fixed(label, classes).read_label("only")
