"""Small archives and trees in the published formats, written by the tests themselves.

* :func:`write_pascal_archives`: a ``VOCtrainval_11-May-2012.tar`` (``VOCdevkit/VOC2012/``:
  ``JPEGImages``, palette-PNG ``SegmentationClass``, ``ImageSets/Segmentation/{train,val,
  trainval}.txt``) and a ``benchmark.tgz`` (``benchmark_RELEASE/dataset/``: ``cls/<id>.mat``
  holding SBD's MATLAB struct ``GTcls`` with ``Segmentation``, ``Boundaries`` and
  ``CategoriesPresent``, written by scipy's ``savemat``; ``train.txt``, ``val.txt``), with the
  labels each prepared map must hold (:class:`PascalArchives`). Image ids are real VOC ids
  (PFENet's shipped list for training, HSNet's val lists for validation), so the shipped lists
  name images the tree holds.
* :func:`write_fss_tree`, :func:`write_class_folders`: FSS-1000's layout (``class/k.jpg`` +
  ``class/k.png``, mask 0/255) and the class-folder layout with masks beside or in ``masks/``.
* COCO: :func:`fixtures_data.write_coco_tree` plus :func:`add_coco_overlaps` (instances that
  overlap each other and a crowd region, listed smallest first).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from fixtures_data import COCO_CATEGORY_IDS, HEIGHT, WIDTH, pascal_label
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules.lists import HSNET_PASCAL, NODUPLICATE, shipped
from datamodules.pascal import voc_palette

VOC_ROOT = "VOCdevkit/VOC2012/"
SBD_ROOT = "benchmark_RELEASE/dataset/"


def jpeg_bytes(seed: int, height: int = HEIGHT, width: int = WIDTH) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def palette_png_bytes(label: np.ndarray) -> bytes:
    """A VOC ``SegmentationClass`` file: palette PNG whose indices are the labels."""
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label))
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sbd_mat_bytes(label: np.ndarray, field_name: str = "GTcls") -> bytes:
    """SBD's ``cls/<id>.mat``: a struct ``GTcls`` (``Boundaries``: a cell of one boundary map
    per class, ``Segmentation``: the label map, ``CategoriesPresent``: the classes)."""
    boundaries = np.empty((20, 1), dtype=object)
    for index in range(20):
        boundaries[index, 0] = np.zeros((2, 2), dtype=np.uint8)
    present = np.unique(label[label > 0]).astype(np.uint8).reshape(-1, 1)
    struct = {"Boundaries": boundaries, "Segmentation": label, "CategoriesPresent": present}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {field_name: struct})
    return buffer.getvalue()


def write_tar(path: Path, members: Iterable[tuple[str, bytes]], mode: str) -> Path:
    """A tar archive (``mode`` ``w`` or ``w:gz``) with fixed member metadata."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _ids(lines: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        if line.strip():
            seen.setdefault(Path(line.split()[0]).stem.split("__")[0], None)
    return list(seen)


@dataclass
class PascalArchives:
    """The written archives and what a correct preparation makes of them."""

    voc_tar: Path
    sbd_tgz: Path
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # id -> expected label map
    train_aug: list[str] = field(default_factory=list)  # expected train_aug.txt, sorted
    val: list[str] = field(default_factory=list)  # VOC val, list order
    noduplicate: list[str] = field(default_factory=list)  # shipped lines of the tree's images
    voc_members: list[tuple[str, bytes]] = field(default_factory=list)
    sbd_members: list[tuple[str, bytes]] = field(default_factory=list)


def write_pascal_archives(
    folder: Path,
    num_train: int = 160,
    num_val: int = 40,
    drop: Iterable[str] = (),
    replace: dict[str, bytes] | None = None,
) -> PascalArchives:
    """VOC and SBD archives over real ids, every class eligible (2048 px) in
    ``num_train / 20`` training and ``num_val / 20`` validation images.

    Training image ``i`` has big class ``i % 20 + 1`` and a 2047-px small class of the same
    PASCAL-5i fold; its label
    comes from VOC (``i < 80``), SBD (``i >= 50``; where both, SBD's big class is another, and
    VOC's must win) and four SBD-only ids outside PFENet's list join ``train_aug``. The first 5
    validation images are also in SBD's val list (so not in ``train_aug``). ``drop`` leaves
    members out; ``replace`` swaps a member's bytes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = _ids(shipped(NODUPLICATE).read_text().splitlines())[:num_train]
    val = _ids((shipped(HSNET_PASCAL) / "val" / "fold0.txt").read_text().splitlines())[:num_val]
    extra = [f"2011_99000{k}" for k in range(4)]  # SBD train ids not in PFENet's list
    unlabelled = ["2012_004000", "2012_004001"]  # VOC images without a segmentation
    voc_train = train[:80]
    sbd_train = train[50:130] + extra
    sbd_val = train[130:] + val[:5]
    result = PascalArchives(folder / "VOCtrainval_11-May-2012.tar", folder / "benchmark.tgz")
    voc: list[tuple[str, bytes]] = []
    sbd: list[tuple[str, bytes]] = []
    for index, image_id in enumerate([*train, *extra, *val, *unlabelled]):
        voc.append((f"{VOC_ROOT}JPEGImages/{image_id}.jpg", jpeg_bytes(index)))
    for index, image_id in enumerate([*train, *extra]):
        group = index % 20 // 5  # the small class is of the big one's fold (BAM drops
        big, small = index % 20 + 1, group * 5 + (index + 1) % 5 + 1  # novel-class images)
        voc_label = pascal_label(big, small)  # with a 255 border line, as VOC's
        sbd_label = np.where(voc_label == 255, 0, voc_label).astype(np.uint8)
        if image_id in voc_train:
            png = palette_png_bytes(voc_label)
            voc.append((f"{VOC_ROOT}SegmentationClass/{image_id}.png", png))
            result.labels[image_id] = voc_label
        if image_id in sbd_train or image_id in sbd_val:
            if image_id in voc_train:  # SBD's label differs; VOC's must win
                sbd_label = np.where(sbd_label == big, big % 20 + 1, sbd_label).astype(np.uint8)
            sbd.append((f"{SBD_ROOT}cls/{image_id}.mat", sbd_mat_bytes(sbd_label)))
            result.labels.setdefault(image_id, sbd_label)
    for index, image_id in enumerate(val):
        label = pascal_label(index % 20 + 1, (index + 3) % 20 + 1)
        voc.append((f"{VOC_ROOT}SegmentationClass/{image_id}.png", palette_png_bytes(label)))
        result.labels[image_id] = label
        if image_id in sbd_val:
            sbd.append((f"{SBD_ROOT}cls/{image_id}.mat", sbd_mat_bytes(np.zeros_like(label))))
    lists = {"train": voc_train, "val": val, "trainval": sorted(voc_train + val)}
    for name, ids in lists.items():
        text = "".join(f"{i}\n" for i in ids).encode()
        voc.append((f"{VOC_ROOT}ImageSets/Segmentation/{name}.txt", text))
    for name, ids in (("train", sbd_train), ("val", sbd_val)):
        sbd.append((f"{SBD_ROOT}{name}.txt", "".join(f"{i}\n" for i in ids).encode()))
    sbd.append((f"{SBD_ROOT}img/{train[60]}.jpg", jpeg_bytes(60)))  # SBD ships images too
    replace = replace or {}
    dropped = set(drop)
    result.voc_members = [(n, replace.get(n, d)) for n, d in voc if n not in dropped]
    result.sbd_members = [(n, replace.get(n, d)) for n, d in sbd if n not in dropped]
    write_tar(result.voc_tar, result.voc_members, "w")
    write_tar(result.sbd_tgz, result.sbd_members, "w:gz")
    result.train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(val))
    result.val = val
    shipped_lines = shipped(NODUPLICATE).read_text().splitlines()
    result.noduplicate = [line for line in shipped_lines if Path(line.split()[0]).stem in train]
    return result


def truncated_copy(path: Path, target: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


# --- class folders ------------------------------------------------------------------------------


def object_mask(index: int, size: int) -> np.ndarray:
    """A 0/255 mask: a rectangle whose position depends on ``index``."""
    mask = np.zeros((size, size), dtype=np.uint8)
    offset = index % (size // 4)
    mask[offset : offset + size // 2, size // 4 : size // 4 + size // 2] = 255
    return mask


def write_fss_tree(root: Path, classes: Iterable[str], per_class: int = 10, size: int = 24) -> Path:
    """FSS-1000's layout: ``root/<class>/<k>.jpg`` and ``<k>.png`` (0/255), ``k = 1..``."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, per_class + 1):
            (folder / f"{k}.jpg").write_bytes(jpeg_bytes(c * 100 + k, size, size))
            Image.fromarray(object_mask(c + k, size)).save(folder / f"{k}.png")
    return root


def write_class_folders(
    root: Path, classes: Iterable[str], per_class: int = 4, size: int = 24, masks_dir: bool = False
) -> Path:
    """Your-own-classes layout: ``root/<class>/<name>.jpg`` with ``<name>.png`` beside it (0/1
    masks), or PNG images with their 0/255 masks in ``root/<class>/masks/``."""
    for c, name in enumerate(classes):
        folder = root / name
        (folder / "masks" if masks_dir else folder).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            mask = object_mask(c + k, size)
            if masks_dir:
                rng = np.random.default_rng(c * 100 + k)
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{k}.png")
                Image.fromarray(mask).save(folder / "masks" / f"img_{k}.png")
            else:
                (folder / f"img_{k}.jpg").write_bytes(jpeg_bytes(c * 100 + k, size, size))
                Image.fromarray((mask // 255).astype(np.uint8)).save(folder / f"img_{k}.png")
    return root


# --- COCO ---------------------------------------------------------------------------------------

#: Image 3 of :func:`add_coco_overlaps` (0-based index 2 of the tree): a 12 x 12 square of
#: category index 5 inside the big polygon, listed first; a crowd box over both and background.
OVERLAP_SQUARE = (slice(10, 22), slice(10, 22))
OVERLAP_CROWD = (slice(0, 40), slice(60, 76))


def add_coco_overlaps(root: Path, split: str = "val2014") -> None:
    """Image id 3: a small compressed-RLE instance inside the big polygon, listed before it
    (painted after it: largest first), and a crowd box over the polygon's edge and the
    background (255 only where no instance is)."""
    path = root / "annotations" / f"instances_{split}.json"
    content = json.loads(path.read_text())
    square = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    square[OVERLAP_SQUARE] = 1
    crowd = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    crowd[OVERLAP_CROWD] = 1
    added = []
    for number, (mask, category, iscrowd) in enumerate(
        ((square, COCO_CATEGORY_IDS[5], 0), (crowd, COCO_CATEGORY_IDS[9], 1))
    ):
        encoded = mask_utils.encode(np.asfortranarray(mask))
        encoded["counts"] = encoded["counts"].decode()
        added.append(
            {"id": 20_000 + number, "image_id": 3, "iscrowd": iscrowd, "area": float(mask.sum()),
             "category_id": category, "segmentation": encoded}
        )  # fmt: skip
    content["annotations"] = added + content["annotations"]
    path.write_text(json.dumps(content))
