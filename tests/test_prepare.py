"""``python -m datamodules.prepare``: the PASCAL-5i tree from VOC/SBD archives and COCO's label
PNGs, on small archives in the published formats (tests/fixtures_archives.py), checked against
the label maps the fixtures built by hand; the failures name the archive, member or field."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fixtures_archives import (
    OVERLAP_CROWD,
    OVERLAP_SQUARE,
    VOC_ROOT,
    PascalArchives,
    add_coco_overlaps,
    palette_png_bytes,
    sbd_mat_bytes,
    truncated_copy,
    write_pascal_archives,
    write_tar,
)
from fixtures_data import BIG, HEIGHT, SMALL, WIDTH, write_coco_tree
from PIL import Image

from datamodules import CocoFewShot, PascalFewShot
from datamodules.lists import HSNET_PASCAL, NODUPLICATE, shipped
from datamodules.pascal import pascal_source
from datamodules.prepare import PrepareError, prepare_coco, prepare_pascal
from datamodules.prepare import pascal as prepare_pascal_module
from datamodules.prepare.__main__ import main as prepare_main
from datamodules.prepare.pascal import PUBLISHED, check_published_counts
from datamodules.protocols import NODUPLICATE_LIST, PROTOCOLS, TRAIN_AUG_LIST
from tasks.segment import main as segment_main

CONFIGS = Path(__file__).parents[1] / "configs" / "segment"
# pycocotools' decode under NumPy 2 warns on every mask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> PascalArchives:
    return write_pascal_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="module")
def voc(archives: PascalArchives, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "VOC2012"
    prepare_pascal(out, archives.voc_tar, archives.sbd_tgz, log=quiet)
    return out


# --- PASCAL: what the tree holds --------------------------------------------------------------


def test_labels_merge_voc_over_sbd_as_single_channel_pngs(
    voc: Path, archives: PascalArchives
) -> None:
    labels = sorted((voc / "SegmentationClassAug").glob("*.png"))
    assert [p.stem for p in labels] == sorted(archives.labels)
    for path in labels:
        with Image.open(path) as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.array(image), archives.labels[path.stem], path.name)
    both = [i for i in archives.labels if 255 in archives.labels[i]]  # VOC's, borders kept
    assert len(both) == 120  # 80 VOC training images (30 of them also in SBD) + 40 val


def test_lists_are_train_aug_val_and_the_shipped_ones(voc: Path, archives: PascalArchives) -> None:
    train_aug = (voc / TRAIN_AUG_LIST).read_text().splitlines()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().splitlines()
    assert train_aug == archives.train_aug and len(train_aug) == 164
    assert val == archives.val
    assert not set(train_aug) & set(val)
    assert (voc / NODUPLICATE_LIST).read_text().splitlines() == archives.noduplicate
    for source in shipped(HSNET_PASCAL).rglob("*.txt"):
        copy = voc / "lists" / HSNET_PASCAL / source.relative_to(shipped(HSNET_PASCAL))
        assert copy.read_bytes() == source.read_bytes()
    for name, data in archives.voc_members:
        if "/JPEGImages/" in name:
            assert (voc / "JPEGImages" / Path(name).name).read_bytes() == data


def test_shipped_lists_are_the_published_files() -> None:
    """Line counts and first/last lines of the repositories' files (datamodules/lists/README)."""
    lines = shipped(NODUPLICATE).read_text().splitlines()
    assert len(lines) == len(set(lines)) == 5953
    assert lines[0] == "JPEGImages/2008_000008.jpg SegmentationClassAug/2008_000008.png"
    fss = {
        s: (shipped("hsnet/fss") / f"{s}.txt").read_text().split() for s in ("trn", "val", "test")
    }
    assert {s: len(n) for s, n in fss.items()} == {"trn": 520, "val": 240, "test": 240}
    assert len(set().union(*fss.values())) == 1000
    val0 = (shipped(HSNET_PASCAL) / "val" / "fold0.txt").read_text().splitlines()
    assert len(val0) == 346 and val0[0] == "2007_000033__01"


def test_rerun_is_a_no_op(voc: Path, archives: PascalArchives) -> None:
    before = {p: p.stat().st_mtime_ns for p in voc.rglob("*")}
    messages: list[str] = []
    record = prepare_pascal(voc, archives.voc_tar, archives.sbd_tgz, log=messages.append)
    assert "nothing to do" in messages[0] and len(messages) == 1
    assert record == json.loads((voc / ".prepared-pascal.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in voc.rglob("*")} == before


def test_two_runs_write_the_same_bytes_and_an_interrupted_run_resumes(
    voc: Path, archives: PascalArchives, tmp_path: Path
) -> None:
    """A run stopped by a truncated SBD archive leaves no record; a stale temporary file is
    removed; the resumed run gives the reference tree byte for byte."""
    out = tmp_path / "VOC2012"
    broken = truncated_copy(archives.sbd_tgz, tmp_path / "benchmark.tgz", 0.6)
    with pytest.raises(PrepareError, match=r"benchmark.tgz is truncated or corrupt"):
        prepare_pascal(out, archives.voc_tar, broken, log=quiet)
    assert not (out / ".prepared-pascal.json").exists()
    assert len(list((out / "SegmentationClassAug").glob("*.png"))) >= 120  # VOC's were written
    (out / "SegmentationClassAug" / ".2008_000008.png.abc.part").write_bytes(b"partial")
    messages: list[str] = []
    prepare_pascal(out, archives.voc_tar, archives.sbd_tgz, log=messages.append)
    assert "removed 1 partial files" in messages[0]
    assert tree_bytes(out) == tree_bytes(voc)


def test_the_tree_reads_under_every_preset_and_the_shipped_list_serves_a_tree_without_it(
    voc: Path, archives: PascalArchives, tmp_path: Path
) -> None:
    for name in PROTOCOLS:
        data = PascalFewShot(root=str(voc), protocol=name, cache_dir=str(tmp_path / "cache"))
        expected = archives.noduplicate if data.protocol["train_list"] == NODUPLICATE_LIST else 0
        assert len(data.source("train").ids) == (len(expected) if expected else 164), name
        assert data.source("test").ids == archives.val
    bare = shutil.copytree(voc, tmp_path / "bare", ignore=shutil.ignore_patterns("lists"))
    source = pascal_source(bare, NODUPLICATE_LIST, "pascal-train")
    assert len(source.ids) == 5953  # the shipped list (its images are not all in this tree)


def test_published_counts_are_required_of_the_published_archives() -> None:
    counts = dict(PUBLISHED)
    check_published_counts(counts)
    check_published_counts({**counts, "voc_val": 40, "train_aug": 164})  # a small archive
    with pytest.raises(PrepareError, match=r"train_aug: 10581 images, expected 10582"):
        check_published_counts({**counts, "train_aug": 10581})


# --- PASCAL: failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_val_list", r"VOCtrainval_11-May-2012.tar has no member "
         r"VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
        ("no_mat", r"benchmark.tgz has no member benchmark_RELEASE/dataset/cls/\S+\.mat "
         r"\(1 listed SBD images without a label\)"),
        ("no_gtcls", r"benchmark.tgz: benchmark_RELEASE/dataset/cls/\S+\.mat: no variable GTcls"),
        ("no_segmentation", r"cls/\S+\.mat: GTcls has no field Segmentation"),
        ("bad_value", r"cls/\S+\.mat: label values \[21\] are not classes \(expected 0..20\)"),
        ("truncated_voc", r"VOCtrainval_11-May-2012.tar is truncated or corrupt"),
        ("swapped", r"benchmark.tgz has no member VOCdevkit/VOC2012/ImageSets/Segmentation/train"),
    ],
)  # fmt: skip
def test_a_bad_archive_is_named(
    case: str, message: str, archives: PascalArchives, tmp_path: Path
) -> None:
    voc_tar, sbd_tgz = archives.voc_tar, archives.sbd_tgz
    sbd_mats = [n for n, _ in archives.sbd_members if n.endswith(".mat")]
    victim = sbd_mats[3]
    if case == "no_val_list":
        voc_tar = write_pascal_archives(
            tmp_path, drop=[f"{VOC_ROOT}ImageSets/Segmentation/val.txt"]
        ).voc_tar
    elif case in ("no_mat", "no_gtcls", "no_segmentation", "bad_value"):
        label = np.zeros((80, 96), dtype=np.uint8)
        replace = {
            "no_gtcls": sbd_mat_bytes(label, field_name="GTinst"),
            "no_segmentation": _mat_without_segmentation(),
            "bad_value": sbd_mat_bytes(label + 21),
        }
        drop = [victim] if case == "no_mat" else []
        made = write_pascal_archives(tmp_path, drop=drop, replace={victim: replace.get(case, b"")})
        sbd_tgz = made.sbd_tgz
    elif case == "truncated_voc":
        voc_tar = truncated_copy(archives.voc_tar, tmp_path / archives.voc_tar.name, 0.5)
    elif case == "swapped":
        voc_tar = archives.sbd_tgz
    with pytest.raises(PrepareError, match=message):
        prepare_pascal(tmp_path / "out", voc_tar, sbd_tgz, log=quiet)
    assert not (tmp_path / "out" / ".prepared-pascal.json").exists()


def _mat_without_segmentation() -> bytes:
    import io

    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"GTcls": {"Boundaries": np.zeros((2, 2))}})
    return buffer.getvalue()


def test_the_command_line_reports_a_bad_archive_in_one_line(
    archives: PascalArchives, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = truncated_copy(archives.sbd_tgz, tmp_path / "benchmark.tgz", 0.3)
    argv = ["pascal", "--out", str(tmp_path / "out"), "--voc-tar", str(archives.voc_tar),
            "--sbd-tgz", str(broken)]  # fmt: skip
    assert prepare_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: archive {broken} is truncated")
    assert prepare_main(["pascal", "--out", str(tmp_path / "out")]) == 1
    assert "give both archives" in capsys.readouterr().err
    blocker = tmp_path / "blocker"  # a file where a folder is wanted: unwritable even for root
    blocker.write_text("")
    argv = ["pascal", "--out", str(blocker / "VOC2012"), "--voc-tar", str(archives.voc_tar),
            "--sbd-tgz", str(archives.sbd_tgz)]  # fmt: skip
    assert prepare_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"error: cannot write the prepared data to '{blocker / 'VOC2012'}' ([Errno 20] Not a "
        f"directory: '{blocker / 'VOC2012'}'); pass a writable path as --out"
    ]


# --- PASCAL: training on the prepared tree ------------------------------------------------------

# configs/segment/pascal.yaml shrunk: ResNet-18 (deep stem, OS 8) instead of ResNet-50, no
# ImageNet file, a small ASGNet head, 64 px, 4 batches of 2 (2 optimizer steps of the config's
# global batch 4), one validation batch.
TINY = ["--data.image_size", "64", "--data.num_workers", "0", "--data.batch_size", "2",
        "--data.val_episodes", "4", "--data.test_episodes", "5", "--data.val_fraction", "0.25",
        "--model.backbone.init_args.weights", "null", "--model.backbone.init_args.arch",
        "resnet18", "--model.head.init_args.bins", "[1.0, 0.5]",
        "--model.head.init_args.reduce_dim", "16", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1"]  # fmt: skip


@pytest.mark.parametrize(
    "protocol",
    [
        "pfenet",
        "hsnet",
        pytest.param("clean", marks=pytest.mark.slow),
        pytest.param("asgnet", marks=pytest.mark.slow),
        pytest.param("bam", marks=pytest.mark.slow),
    ],
)
def test_pascal_config_fits_on_the_prepared_tree(voc: Path, tmp_path: Path, protocol: str) -> None:
    cli = segment_main(["fit", "--config", str(CONFIGS / "pascal.yaml"), "--data.root", str(voc),
                        "--data.protocol", protocol, "--data.cache_dir", str(tmp_path / "cache"),
                        *TINY, "--trainer.logger.init_args.save_dir",
                        str(tmp_path / "runs")])  # fmt: skip
    assert cli.trainer.global_step == 2 and "val/miou" in cli.trainer.callback_metrics
    assert cli.datamodule.protocol["name"] == protocol
    assert list((tmp_path / "runs").rglob("best-epoch=000.ckpt"))


# --- COCO ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_coco_tree(tmp_path_factory.mktemp("coco") / "coco", num_images=240)
    add_coco_overlaps(root)
    prepare_coco(root, log=quiet)  # into root/annotations: HSNet's layout
    return root


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.array(image)


def test_coco_pngs_hold_the_hand_built_labels(coco: Path) -> None:
    """Polygon, RLE and crowd of image 1; the small RLE inside the big polygon of image 3 is on
    top though listed first (largest first); crowd is 255 only where no instance is."""
    folder = coco / "annotations"
    assert len(list((folder / "train2014").glob("*.png"))) == 240
    label = read_png(folder / "val2014" / "COCO_val2014_000000000000.png")
    assert (label[SMALL] == 41).all()  # uncompressed RLE of category index 40
    rows, cols = BIG
    assert (label[rows.start + 1 : rows.stop - 1, cols.start + 1 : cols.stop - 1] == 1).all()
    assert (label[:, 86:][label[:, 86:] != 41] == 255).all()  # crowd outside the instances
    assert label[0, 0] == 0 and label[78, 2] == 0
    label = read_png(folder / "val2014" / "COCO_val2014_000000000002.png")
    assert (label[OVERLAP_SQUARE] == 6).all()
    crowd = np.zeros_like(label, dtype=bool)
    crowd[OVERLAP_CROWD] = True
    assert (label[crowd & (np.arange(80)[:, None] < 3)] == 255).all()  # above the polygon
    assert (label[8:30, 62:66] == 3).all()  # the polygon wins over the crowd


def test_coco_masks_give_the_json_loaders_index_and_workers_the_same_bytes(
    coco: Path, tmp_path: Path
) -> None:
    common = {"root": str(coco), "cache_dir": str(tmp_path / "cache"), "image_size": 64}
    masks = CocoFewShot(masks="annotations", **common)
    json_based = CocoFewShot(**common)
    for split in ("train", "test"):
        assert masks.counts(split) == json_based.counts(split)
    pngs, rasterised = masks.source("test"), json_based.source("test")
    assert pngs.ids == rasterised.ids
    for image_id in pngs.ids:
        np.testing.assert_array_equal(pngs.read_label(image_id), rasterised.read_label(image_id))
    parallel = tmp_path / "parallel"
    prepare_coco(coco, out=parallel, workers=2, log=quiet)
    rendered = {k: v for k, v in tree_bytes(coco / "annotations").items() if k.endswith("png")}
    assert {k: v for k, v in tree_bytes(parallel).items() if k.endswith("png")} == rendered
    messages: list[str] = []
    prepare_coco(coco, out=parallel, log=messages.append)
    assert messages == [f"{parallel} is already prepared ({{'train2014': 240, 'val2014': 240}}); "
                        "nothing to do"]  # fmt: skip


def test_hsnets_png_layout_reads_without_the_json(coco: Path, tmp_path: Path) -> None:
    """HSNet's ``annotations/{train,val}2014/*.png`` beside the images is a whole dataset."""
    hsnet = Path(shutil.copytree(coco, tmp_path / "coco", ignore=shutil.ignore_patterns("*.json")))
    assert not list(hsnet.rglob("*.json"))
    data = CocoFewShot(root=str(hsnet), masks="annotations", cache_dir=str(tmp_path / "cache"))
    reference = CocoFewShot(root=str(coco), cache_dir=str(tmp_path / "cache"))
    assert data.counts("test") == reference.counts("test")
    assert len(data.source("train").ids) == 240


def test_coco_failures_name_the_file_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = write_coco_tree(tmp_path / "coco", num_images=2)
    image = root / "val2014" / "COCO_val2014_000000000001.jpg"
    data = image.read_bytes()
    image.unlink()
    with pytest.raises(PrepareError, match=r"image \S+COCO_val2014_000000000001.jpg of \S+"
                       r"instances_val2014.json not found"):  # fmt: skip
        prepare_coco(root, log=quiet)
    assert not (root / "annotations" / ".prepared-coco.json").exists()
    image.write_bytes(data)
    assert prepare_main(["coco", "--root", str(root)]) == 0  # resumes: val2014's second image
    assert "written this run: {'train2014': 0, 'val2014': 1}" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    prepare_coco(root, out=fresh, log=quiet)
    resumed = tree_bytes(root / "annotations")
    assert tree_bytes(fresh) == {k: v for k, v in resumed.items() if "instances_" not in k}
    os.remove(root / "annotations" / "instances_train2014.json")
    with pytest.raises(PrepareError, match=r"annotation file not found: \S+instances_train2014"):
        prepare_coco(root, out=tmp_path / "other", log=quiet)


@pytest.mark.parametrize("protocol", ["asgnet", pytest.param("hsnet", marks=pytest.mark.slow)])
def test_coco_config_fits_on_the_rendered_masks(coco: Path, tmp_path: Path, protocol: str) -> None:
    cli = segment_main(["fit", "--config", str(CONFIGS / "coco.yaml"), "--data.root", str(coco),
                        "--data.masks", "annotations", "--data.protocol", protocol,
                        "--data.cache_dir", str(tmp_path / "cache"), "--data.min_pixels", "2048",
                        *TINY, "--data.val_fraction", "0.2",
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    assert cli.trainer.global_step == 1 and "val/miou" in cli.trainer.callback_metrics


# --- PASCAL: downloading ------------------------------------------------------------------------


@pytest.fixture
def served(archives: PascalArchives) -> Iterator[str]:
    """The archives' folder over HTTP on 127.0.0.1 (torchvision's helper speaks HTTP)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(archives.voc_tar.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_the_md5_and_builds_the_same_tree(
    served: str, archives: PascalArchives, voc: Path, tmp_path: Path, monkeypatch
) -> None:
    for name, path in (("VOC", archives.voc_tar), ("SBD", archives.sbd_tgz)):
        published = getattr(prepare_pascal_module, name)
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        here = dataclasses.replace(published, url=f"{served}/{path.name}", md5=md5)
        monkeypatch.setattr(prepare_pascal_module, name, here)
    downloads = tmp_path / "downloads"
    argv = ["pascal", "--out", str(tmp_path / "VOC2012"), "--download", "--downloads",
            str(downloads)]  # fmt: skip
    assert prepare_main(argv) == 0
    assert tree_bytes(tmp_path / "VOC2012") == tree_bytes(voc)
    assert (downloads / archives.sbd_tgz.name).read_bytes() == archives.sbd_tgz.read_bytes()
    wrong = dataclasses.replace(prepare_pascal_module.VOC, md5="0" * 32)
    monkeypatch.setattr(prepare_pascal_module, "VOC", wrong)
    with pytest.raises(PrepareError, match=r"cannot download http://127.0.0.1:\d+/VOCtrainval"):
        prepare_pascal(tmp_path / "again", download_to=tmp_path / "fresh", log=quiet)


# --- Rerunning on an earlier run's tree, and inputs checked first --------------------------------


def run_cli(
    argv: Sequence[str | Path], capsys: pytest.CaptureFixture
) -> tuple[int, str, list[str]]:
    """``python -m datamodules.prepare ARGV``: exit code, stdout, stderr lines."""
    code = prepare_main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def mtimes(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in sorted(folder.glob("*.png"))}


@pytest.fixture
def small_coco(tmp_path: Path) -> Path:
    return write_coco_tree(tmp_path / "coco", num_images=4)


def test_coco_renders_the_splits_a_first_run_left_out(
    small_coco: Path, capsys: pytest.CaptureFixture
) -> None:
    """After ``--splits val2014``, a plain run renders train2014 (and only it); the record then
    names both splits and a third run has nothing to do."""
    root, annotations = small_coco, small_coco / "annotations"
    code, out, _ = run_cli(["coco", "--root", root, "--splits", "val2014"], capsys)
    assert code == 0 and "written this run: {'val2014': 4}" in out
    val = mtimes(annotations / "val2014")
    assert len(val) == 4
    code, out, _ = run_cli(["coco", "--root", root], capsys)
    assert code == 0 and "written this run: {'train2014': 4}" in out
    assert len(list((annotations / "train2014").glob("*.png"))) == 4
    assert mtimes(annotations / "val2014") == val
    record = json.loads((annotations / ".prepared-coco.json").read_text())
    assert record["splits"] == ["train2014", "val2014"]
    assert record["counts"] == {"train2014": 4, "val2014": 4}
    code, out, _ = run_cli(["coco", "--root", root], capsys)
    assert code == 0 and "nothing to do" in out


def test_a_finished_coco_tree_missing_label_maps_renders_them(
    small_coco: Path, capsys: pytest.CaptureFixture
) -> None:
    root, annotations = small_coco, small_coco / "annotations"
    assert run_cli(["coco", "--root", root], capsys)[0] == 0
    reference = tree_bytes(annotations)
    (annotations / "train2014" / "COCO_train2014_000000000002.png").unlink()
    code, out, _ = run_cli(["coco", "--root", root], capsys)
    assert code == 0 and "holds 3 of the 4 label maps recorded" in out
    assert "written this run: {'train2014': 1}" in out
    assert tree_bytes(annotations) == reference


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "interrupted"])
def test_empty_or_broken_coco_label_maps_are_rendered_again(
    small_coco: Path, finished: bool, capsys: pytest.CaptureFixture
) -> None:
    """A 0-byte PNG (a finished tree's, or an interrupted run's) and a truncated one are not
    kept: the rerun renders both again."""
    root, annotations = small_coco, small_coco / "annotations"
    assert run_cli(["coco", "--root", root], capsys)[0] == 0
    reference = tree_bytes(annotations)
    val = annotations / "val2014"
    (val / "COCO_val2014_000000000001.png").write_bytes(b"")
    truncated_copy(val / "COCO_val2014_000000000003.png", val / "COCO_val2014_000000000003.png")
    if not finished:
        (annotations / ".prepared-coco.json").unlink()
    code, out, _ = run_cli(["coco", "--root", root], capsys)
    assert code == 0 and "'val2014': 2}" in out
    assert tree_bytes(annotations) == reference


def test_a_finished_pascal_tree_missing_files_is_rebuilt_from_the_archives(
    voc: Path, archives: PascalArchives, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without the archives the rerun fails in one line naming what is missing and how to
    rebuild it, and unmarks the tree; with them it writes the missing files again."""
    out = Path(shutil.copytree(voc, tmp_path / "VOC2012"))
    label = out / "SegmentationClassAug" / f"{archives.val[0]}.png"
    label.unlink()
    (out / TRAIN_AUG_LIST).unlink()
    code, _, error = run_cli(["pascal", "--out", out], capsys)
    assert code == 1 and len(error) == 1
    assert error[0].startswith(f"error: {out} is incomplete ({out / TRAIN_AUG_LIST} is missing)")
    assert "give both archives" in error[0]
    assert not (out / ".prepared-pascal.json").exists()
    argv = ["pascal", "--out", out, "--voc-tar", archives.voc_tar, "--sbd-tgz", archives.sbd_tgz]
    (out / TRAIN_AUG_LIST).write_text("")  # an empty list is missing too
    assert run_cli(argv, capsys)[0] == 0
    assert tree_bytes(out) == tree_bytes(voc)


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "interrupted"])
def test_empty_or_broken_pascal_labels_are_written_again(
    voc: Path,
    archives: PascalArchives,
    tmp_path: Path,
    finished: bool,
    capsys: pytest.CaptureFixture,
) -> None:
    """A 0-byte VOC label and a truncated SBD one are not kept, record or not."""
    out = Path(shutil.copytree(voc, tmp_path / "VOC2012"))
    voc_id = archives.val[1]  # labelled by VOC only
    sbd_id = next(i for i in archives.train_aug if i.startswith("2011_99000"))  # by SBD only
    (out / "SegmentationClassAug" / f"{voc_id}.png").write_bytes(b"")
    sbd_label = out / "SegmentationClassAug" / f"{sbd_id}.png"
    truncated_copy(sbd_label, sbd_label)
    if not finished:
        (out / ".prepared-pascal.json").unlink()
    argv = ["pascal", "--out", out, "--voc-tar", archives.voc_tar, "--sbd-tgz", archives.sbd_tgz]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0 and "'voc_labels': 1, 'sbd_labels': 1}" in stdout
    assert tree_bytes(out) == tree_bytes(voc)


@pytest.mark.parametrize("order", ["images_first", "labels_first"])
def test_a_voc_label_of_another_size_than_its_image_is_an_error(
    voc: Path,
    archives: PascalArchives,
    tmp_path: Path,
    order: str,
    capsys: pytest.CaptureFixture,
) -> None:
    """Named with both files and sizes, whichever of the two the archive holds first; the tree
    is not marked finished, and the correct archive then replaces the label."""
    victim = archives.val[2]
    member = f"{VOC_ROOT}SegmentationClass/{victim}.png"
    small = palette_png_bytes(np.zeros((HEIGHT // 2, WIDTH // 2), dtype=np.uint8))
    members = [(name, small if name == member else data) for name, data in archives.voc_members]
    if order == "labels_first":
        members.reverse()
    voc_tar = write_tar(tmp_path / archives.voc_tar.name, members, "w")
    out = tmp_path / "VOC2012"
    argv = ["pascal", "--out", out, "--voc-tar", voc_tar, "--sbd-tgz", archives.sbd_tgz]
    code, _, error = run_cli(argv, capsys)
    label = f"{voc_tar}: {member}" if order == "images_first" else out / "SegmentationClassAug"
    assert code == 1 and len(error) == 1
    assert error[0].startswith(f"error: {label}")
    image = out / "JPEGImages" / f"{victim}.jpg"
    assert error[0].endswith(
        f"label is {(HEIGHT // 2, WIDTH // 2)} but image {image} is {(HEIGHT, WIDTH)} (height, "
        "width)"
    )
    assert not (out / ".prepared-pascal.json").exists()
    argv = ["pascal", "--out", out, "--voc-tar", archives.voc_tar, "--sbd-tgz", archives.sbd_tgz]
    assert run_cli(argv, capsys)[0] == 0
    assert tree_bytes(out) == tree_bytes(voc)


def test_a_mistyped_input_is_named_before_any_work(
    archives: PascalArchives, small_coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A wrong ``--sbd-tgz`` is reported before the VOC archive is read, a folder given as an
    archive too; a wrong ``--root`` before a folder is made in it; a split without its JSON
    before another split is rendered."""
    out, typo = tmp_path / "VOC2012", tmp_path / "benchmark.tg"
    argv = ["pascal", "--out", out, "--voc-tar", archives.voc_tar, "--sbd-tgz", typo]
    code, _, error = run_cli(argv, capsys)
    assert code == 1 and error == [
        f"error: --sbd-tgz {typo} does not exist; expected the file benchmark.tgz (1.4 GB, "
        f"{prepare_pascal_module.SBD.url})"
    ]
    assert not out.exists()  # no empty --out left behind
    argv = ["pascal", "--out", out, "--voc-tar", tmp_path, "--sbd-tgz", archives.sbd_tgz]
    code, _, error = run_cli(argv, capsys)
    assert code == 1 and error[0].startswith(f"error: --voc-tar {tmp_path} is a folder;")
    code, _, error = run_cli(["coco", "--root", tmp_path / "cocoo"], capsys)
    assert code == 1 and error == [
        f"error: --root {tmp_path / 'cocoo'} is not a folder (expected COCO 2014: train2014/, "
        "val2014/, annotations/instances_*.json)"
    ]
    assert not (tmp_path / "cocoo").exists()
    train_json = small_coco / "annotations" / "instances_train2014.json"
    train_json.unlink()
    argv = ["coco", "--root", small_coco, "--splits", "val2014", "train2014"]
    code, _, error = run_cli(argv, capsys)
    assert code == 1 and error == [
        f"error: annotation file not found: {train_json} (expected COCO 2014's "
        "annotations_trainval2014.zip unzipped into --root)"
    ]
    assert not (small_coco / "annotations" / "val2014").exists()
