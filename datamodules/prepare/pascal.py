"""PASCAL-5i from VOC2012 trainval and SBD: ``SegmentationClassAug`` and its lists.

Facts (VOC2012 devkit; SBD, Hariharan et al., ICCV 2011, ``benchmark.tgz``; torchvision's
``datasets.VOCSegmentation`` and ``datasets.SBDataset`` for the URLs, checksums and the ``.mat``
layout):

* VOC's ``SegmentationClass/*.png`` are palette PNGs whose indices are the labels (0..20, 255
  on object borders); 2913 images, ``ImageSets/Segmentation/train.txt`` (1464) and ``val.txt``
  (1449).
* SBD's ``benchmark_RELEASE/dataset/cls/<id>.mat`` hold a struct ``GTcls`` whose field
  ``Segmentation`` is the label map (0..20, no border label); 11355 images, ``train.txt``
  (8498) and ``val.txt`` (2857). Every SBD image is a VOC2012 image.
* ``SegmentationClassAug`` (as distributed with DeepLab and used by PFENet, ASGNet, HSNet, BAM):
  VOC's label where VOC has one, SBD's otherwise (12031 maps); its training list
  ``train_aug.txt`` is (VOC train + SBD train + SBD val) - VOC val = 10582 ids.

A label map is kept from an earlier run only when it is a complete PNG of its image's size, and
written only when its size is its image's: every label is checked against its image before the
tree is marked finished. A tree marked finished is checked before "nothing to do": its lists,
with the counts the record holds, and the image and label of every listed id (a stat each);
when any is missing or empty the record is removed and the missing files are rebuilt from the
archives (which the run then needs).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from ..files import write_atomic
from ..lists import HSNET_PASCAL, NODUPLICATE, shipped
from ..protocols import NODUPLICATE_LIST, TRAIN_AUG_LIST
from .common import (
    Log,
    PrepareError,
    encode_label_png,
    image_shape,
    non_empty,
    png_shape,
    read_record,
    remove_partial_files,
    remove_record,
    write_bytes,
    write_record,
)


@dataclass(frozen=True)
class Archive:
    """A published archive: where to download it and its checksum (torchvision's)."""

    filename: str
    url: str
    md5: str
    size: str  # download size, for messages


VOC = Archive(
    "VOCtrainval_11-May-2012.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "6cd6e144f989b92b3379bac3b3de84fd",
    "1.9 GB",
)
SBD = Archive(
    "benchmark.tgz",
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz",
    "82b4d87ceb2ed10f6038a1cba92111cb",
    "1.4 GB",
)
VOC_ROOT = "VOCdevkit/VOC2012/"
SBD_ROOT = "benchmark_RELEASE/dataset/"
VAL_LIST = "ImageSets/Segmentation/val.txt"
NUM_CLASSES = 20
IGNORE = 255
#: The published counts: checked when the archives' own lists have the published sizes.
PUBLISHED = {
    "voc_train": 1464,
    "voc_val": 1449,
    "sbd_train": 8498,
    "sbd_val": 2857,
    "train_aug": 10582,
    "labels": 12031,
    "noduplicate": 5953,
}


def download(archive: Archive, folder: Path, log: Log) -> Path:
    """``archive`` in ``folder``, downloaded (with a progress bar) and its md5 checked by
    torchvision's helper; an existing file with the right checksum is kept."""
    from torchvision.datasets.utils import check_integrity, download_url

    path = folder / archive.filename
    if not check_integrity(str(path), archive.md5):
        log(f"downloading {archive.url} ({archive.size}) to {folder}")
        try:
            download_url(archive.url, str(folder), archive.filename, archive.md5)
        except Exception as error:  # urllib's, http's and torchvision's own errors
            raise PrepareError(
                f"cannot download {archive.url}: {error}; download it by other means and pass "
                f"the file with --voc-tar / --sbd-tgz"
            ) from error
    if not check_integrity(str(path), archive.md5):
        raise PrepareError(f"{path}: md5 is not {archive.md5} (the published {archive.filename})")
    return path


def truncated(path: Path, error: BaseException, what: Archive) -> PrepareError:
    return PrepareError(
        f"archive {path} is truncated or corrupt ({type(error).__name__}: {error}); expected "
        f"the published {what.filename} (md5 {what.md5}, {what.url})"
    )


ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def iterate_archive(path: Path, what: Archive) -> Iterator[tuple[tarfile.TarInfo, MemberReader]]:
    """The members of a tar archive in stored order (one sequential read, which a ``.tgz``
    needs), each with a reader of its bytes; a truncated or corrupt archive is named with what
    it should have been. A plain tar cut at a member boundary reads as a shorter archive, so
    its end-of-archive blocks are required."""
    with path.open("rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                yield member, MemberReader(tar, member, path, what)
            if not compressed and path.stat().st_size - tar.offset < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive blocks after byte {tar.offset}")
    except ARCHIVE_ERRORS as error:
        raise truncated(path, error, what) from error


@dataclass(frozen=True)
class MemberReader:
    """Reads one member's bytes (while the archive is at that member)."""

    tar: tarfile.TarFile
    member: tarfile.TarInfo
    path: Path
    what: Archive

    def read(self) -> bytes:
        try:
            file = self.tar.extractfile(self.member)
            if file is None:
                raise PrepareError(f"{self.path}: member {self.member.name} is not a file")
            return file.read()
        except ARCHIVE_ERRORS as error:
            raise truncated(self.path, error, self.what) from error


def read_ids(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode().splitlines() if line.strip()]


def check_label(label: np.ndarray, origin: str, allow_ignore: bool) -> None:
    """Label values must be classes (0..20) or, for VOC, 255."""
    values = np.unique(label)
    allowed = (values <= NUM_CLASSES) | ((values == IGNORE) & allow_ignore)
    if not allowed.all():
        extra = f" and {IGNORE}" if allow_ignore else ""
        raise PrepareError(
            f"{origin}: label values {values[~allowed].tolist()} are not classes (expected "
            f"0..{NUM_CLASSES}{extra})"
        )


def voc_label(data: bytes, origin: str) -> np.ndarray:
    """The indices of a VOC ``SegmentationClass`` palette PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("P", "L"):
                raise PrepareError(f"{origin}: mode {image.mode}, expected a palette (P) PNG")
            label = np.array(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise PrepareError(f"{origin}: not a readable PNG ({error})") from error
    check_label(label, origin, allow_ignore=True)
    return label


def sbd_label(data: bytes, origin: str) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` (MATLAB struct; read with scipy)."""
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["GTcls"])
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        raise PrepareError(f"{origin}: not a readable .mat file ({error})") from error
    if "GTcls" not in mat:
        raise PrepareError(f"{origin}: no variable GTcls (expected SBD's struct GTcls)")
    struct = mat["GTcls"]
    names = struct.dtype.names or ()
    if "Segmentation" not in names:
        raise PrepareError(
            f"{origin}: GTcls has no field Segmentation (fields: {list(names)}; expected SBD's "
            "GTcls.Segmentation label map)"
        )
    label = np.asarray(struct["Segmentation"].flat[0])
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise PrepareError(
            f"{origin}: GTcls.Segmentation is {label.dtype} of shape {label.shape}, expected a "
            "2-D integer label map"
        )
    check_label(label, origin, allow_ignore=False)
    return label.astype(np.uint8)


def check_published_counts(counts: dict[str, int]) -> None:
    """When the archives' own lists have the published sizes (so they are the published
    archives), every derived count must be the published one too; smaller archives (tests, a
    subset) are checked for consistency only (every listed image has its image and label)."""
    sources = ("voc_train", "voc_val", "sbd_train", "sbd_val")
    if all(counts.get(key) == PUBLISHED[key] for key in sources):
        for key, expected in PUBLISHED.items():
            if counts.get(key) != expected:
                raise PrepareError(
                    f"{key}: {counts.get(key)} images, expected {expected} from the published "
                    "VOC2012 and SBD archives"
                )


def given_archive(path: Path | None, option: str, what: Archive) -> Path | None:
    """A given archive must be a file, checked before any is read: a typo in ``--sbd-tgz``
    would otherwise show only once the 1.9 GB VOC archive is read."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise PrepareError(
            f"{option} {path} {state}; expected the file {what.filename} ({what.size}, {what.url})"
        )
    return path


def tree_shortfall(out: Path, record: dict[str, Any]) -> str | None:
    """What a tree marked finished lacks (``None``: nothing): every list the run writes, with
    the counts the record holds, and a non-empty image and label for every id of the training
    and validation lists. Reads the lists and stats files, opens no image: a rerun on a
    finished tree stays instant."""
    counts = record["counts"]
    lists = {TRAIN_AUG_LIST: counts["train_aug"], NODUPLICATE_LIST: counts["noduplicate"]}
    for key, expected in counts.items():  # voc_train, voc_val, ...: VOC's own lists
        if key.startswith("voc_"):
            lists[f"ImageSets/Segmentation/{key[4:]}.txt"] = expected
    listed: dict[str, list[str]] = {}
    for name, expected in lists.items():
        path = out / name
        if not non_empty(path):
            return f"{path} is missing"
        listed[name] = read_ids(path.read_bytes())
        if len(listed[name]) != expected:
            return f"{path} lists {len(listed[name])} images, not the {expected} recorded"
    hsnet = shipped(HSNET_PASCAL)
    for source in sorted(hsnet.rglob("*.txt")):
        copy = out / "lists" / HSNET_PASCAL / source.relative_to(hsnet)
        if not non_empty(copy):
            return f"{copy} is missing"
    ids = listed[TRAIN_AUG_LIST] + listed[VAL_LIST]
    files = [out / "JPEGImages" / f"{i}.jpg" for i in ids]
    files += [out / "SegmentationClassAug" / f"{i}.png" for i in ids]
    missing = [path for path in files if not non_empty(path)]
    if missing:
        return f"{len(missing)} listed files are missing or empty ({missing[0]}, ...)"
    return None


class PascalBuilder:
    """One preparation run into ``out`` (see :func:`prepare_pascal`)."""

    def __init__(self, out: Path, log: Log) -> None:
        self.out = out
        self.log = log
        self.images = out / "JPEGImages"
        self.labels = out / "SegmentationClassAug"
        self.lists: dict[str, list[str]] = {}
        self.voc_labelled: set[str] = set()
        self.sbd_labelled: set[str] = set()
        self.written = {"images": 0, "voc_labels": 0, "sbd_labels": 0}

    def label_path(self, image_id: str) -> Path:
        return self.labels / f"{image_id}.png"

    def image_path(self, image_id: str) -> Path:
        return self.images / f"{image_id}.jpg"

    def label_kept(self, image_id: str) -> bool:
        """Whether an earlier run's label map can stay: a complete PNG of its image's size. A
        0-byte, truncated or mis-sized file (or one whose image is not written yet) is rendered
        again from the archive."""
        image = self.image_path(image_id)
        shape = png_shape(self.label_path(image_id))
        return shape is not None and image.is_file() and shape == image_shape(image)

    def check_size(self, shape: tuple[int, ...], image_id: str, origin: str) -> None:
        """A label map of another size than its image (once written) is an error before it is
        written; the loaders would refuse the pair, or the training misalign them."""
        image = self.image_path(image_id)
        if image.is_file() and image_shape(image) != shape:
            raise PrepareError(
                f"{origin}: label is {shape} but image {image} is {image_shape(image)} "
                "(height, width)"
            )

    def voc_pass(self, path: Path) -> None:
        """JPEGImages, VOC's labels (converted to grayscale PNGs) and the segmentation lists."""
        seen_images = 0
        for member, reader in iterate_archive(path, VOC):
            if not member.isfile() or not member.name.startswith(VOC_ROOT):
                continue
            relative = member.name[len(VOC_ROOT) :]
            folder, _, name = relative.rpartition("/")
            stem = name.rsplit(".", 1)[0]
            if folder == "JPEGImages" and name.endswith(".jpg"):
                seen_images += 1
                target = self.images / name
                if not target.is_file() or target.stat().st_size != member.size:
                    write_bytes(target, reader.read())
                    self.written["images"] += 1
            elif folder == "SegmentationClass" and name.endswith(".png"):
                self.voc_labelled.add(stem)
                if not self.label_kept(stem):
                    origin = f"{path}: {member.name}"
                    label = voc_label(reader.read(), origin)
                    self.check_size(label.shape, stem, origin)
                    write_bytes(self.label_path(stem), encode_label_png(label))
                    self.written["voc_labels"] += 1
            elif folder == "ImageSets/Segmentation" and name.endswith(".txt"):
                data = reader.read()
                self.lists[f"voc_{stem}"] = read_ids(data)
                write_bytes(self.out / relative, data)
        for key, member_name in (
            ("voc_train", "ImageSets/Segmentation/train.txt"),
            ("voc_val", VAL_LIST),
        ):
            if key not in self.lists:
                raise PrepareError(
                    f"archive {path} has no member {VOC_ROOT}{member_name}: is it "
                    f"{VOC.filename} (VOC2012 trainval)?"
                )
        if not seen_images or not self.voc_labelled:
            missing = "JPEGImages/*.jpg" if not seen_images else "SegmentationClass/*.png"
            raise PrepareError(f"archive {path} has no members {VOC_ROOT}{missing}")

    def sbd_pass(self, path: Path) -> None:
        """SBD's ``cls/*.mat`` of images VOC does not label, as grayscale PNGs."""
        sbd_ids: set[str] = set()
        for member, reader in iterate_archive(path, SBD):
            if not member.isfile() or not member.name.startswith(SBD_ROOT):
                continue
            relative = member.name[len(SBD_ROOT) :]
            if relative in ("train.txt", "val.txt"):
                self.lists[f"sbd_{relative[:-4]}"] = read_ids(reader.read())
            elif relative.startswith("cls/") and relative.endswith(".mat"):
                stem = relative[4:-4]
                sbd_ids.add(stem)
                origin = f"{path}: {member.name}"
                if stem in self.voc_labelled:  # VOC's label wins (it has the 255 borders)
                    sbd_label(reader.read(), origin)  # checked all the same
                elif not self.label_kept(stem):
                    label = sbd_label(reader.read(), origin)
                    if not self.image_path(stem).is_file():
                        raise PrepareError(
                            f"{origin}: no image {stem}.jpg in the VOC archive (SBD's images are "
                            "VOC2012's); is the VOC archive the 2012 trainval one?"
                        )
                    self.check_size(label.shape, stem, origin)
                    write_bytes(self.label_path(stem), encode_label_png(label))
                    self.written["sbd_labels"] += 1
                self.sbd_labelled.add(stem)
        for key in ("sbd_train", "sbd_val"):
            if key not in self.lists:
                raise PrepareError(
                    f"archive {path} has no member {SBD_ROOT}{key[4:]}.txt: is it SBD's "
                    f"{SBD.filename}?"
                )
        listed = set(self.lists["sbd_train"]) | set(self.lists["sbd_val"])
        missing = sorted(listed - sbd_ids)
        if missing:
            raise PrepareError(
                f"archive {path} has no member {SBD_ROOT}cls/{missing[0]}.mat "
                f"({len(missing)} listed SBD images without a label)"
            )

    def write_lists(self) -> dict[str, int]:
        """``train_aug.txt``, PFENet's list (restricted to the tree's images: all 5953 on the
        published archives) and HSNet's fold lists; then the checks."""
        lists = self.lists
        val = set(lists["voc_val"])
        train = set(lists["voc_train"]) | set(lists["sbd_train"]) | set(lists["sbd_val"])
        train_aug = sorted(train - val)
        for image_id in [*train_aug, *lists["voc_val"]]:
            for path, what in (
                (self.image_path(image_id), "image"),
                (self.label_path(image_id), "label"),
            ):
                if not path.is_file():
                    raise PrepareError(
                        f"listed image {image_id} has no {what} ({path} missing): the archives "
                        "do not hold every listed image"
                    )
        for image_id in sorted(self.voc_labelled | self.sbd_labelled):
            # VOC's archive may hold a label before its image: checked once both are written
            label = self.label_path(image_id)
            self.check_size(image_shape(label), image_id, str(label))
        write_atomic(self.out / TRAIN_AUG_LIST, "".join(f"{i}\n" for i in train_aug))
        shipped_lines = shipped(NODUPLICATE).read_text().splitlines()
        trainable = set(train_aug)
        kept = [line for line in shipped_lines if self._listed_id(line) in trainable]
        write_atomic(self.out / NODUPLICATE_LIST, "".join(f"{line}\n" for line in kept))
        hsnet = shipped(HSNET_PASCAL)
        for source in sorted(hsnet.rglob("*.txt")):  # reference copies, byte for byte
            write_bytes(self.out / "lists" / HSNET_PASCAL / source.relative_to(hsnet),
                        source.read_bytes())  # fmt: skip
        in_val = sorted({self._listed_id(line) for line in kept} & val)
        if in_val:
            raise PrepareError(f"validation image {in_val[0]} is in {NODUPLICATE_LIST}")
        counts = {key: len(ids) for key, ids in sorted(lists.items())}
        counts |= {
            "train_aug": len(train_aug),
            "labels": len(self.voc_labelled | self.sbd_labelled),
            "noduplicate": len(kept),
            "noduplicate_shipped": len(shipped_lines),
        }
        check_published_counts(counts)
        return counts

    @staticmethod
    def _listed_id(line: str) -> str:
        return Path(line.split()[0]).stem


def prepare_pascal(
    out: Path,
    voc_tar: Path | None = None,
    sbd_tgz: Path | None = None,
    download_to: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Build the PASCAL-5i tree of :data:`datamodules.pascal.PASCAL_LAYOUT` in ``out``.

    From the given archives, or those downloaded into ``download_to`` (checksums checked).
    Returns the record written to ``out/.prepared-pascal.json``: list sizes and the archives'
    names and sizes. A finished tree that holds what its record says is left as it is.
    """
    out = Path(out)
    voc_tar = given_archive(voc_tar, "--voc-tar", VOC)
    sbd_tgz = given_archive(sbd_tgz, "--sbd-tgz", SBD)
    record = read_record(out, "pascal")
    shortfall = tree_shortfall(out, record) if record is not None else None
    if record is not None and shortfall is None:
        log(f"{out} is already prepared (from {sorted(record['archives'])}); nothing to do")
        return record
    if shortfall is not None:
        log(f"{out} was prepared but {shortfall}: rebuilding the missing files from the archives")
        remove_record(out, "pascal")
    if download_to is not None:
        download_to.mkdir(parents=True, exist_ok=True)
        voc_tar = voc_tar or download(VOC, download_to, log)
        sbd_tgz = sbd_tgz or download(SBD, download_to, log)
    if voc_tar is None or sbd_tgz is None:
        why = f"{out} is incomplete ({shortfall}): " if shortfall is not None else ""
        raise PrepareError(
            f"{why}give both archives ({VOC.filename} as --voc-tar, {SBD.filename} as "
            "--sbd-tgz) or --download"
        )
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_partial_files(out)
    if removed:
        log(f"resuming: removed {removed} partial files of an interrupted run")
    builder = PascalBuilder(out, log)
    log(f"reading {voc_tar}")
    builder.voc_pass(voc_tar)
    log(f"reading {sbd_tgz}")
    builder.sbd_pass(sbd_tgz)
    counts = builder.write_lists()
    record = {
        "dataset": "pascal",
        "archives": {Path(p).name: Path(p).stat().st_size for p in (voc_tar, sbd_tgz)},
        "counts": counts,
    }
    write_record(out, "pascal", record)
    log(
        f"PASCAL-5i tree ready in {out}: {counts['train_aug']} training images "
        f"(train_aug.txt), {counts['voc_val']} test images (val.txt), {counts['labels']} label "
        f"maps; written this run: {builder.written}"
    )
    return record
