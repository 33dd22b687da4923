"""Image classification data: an ImageFolder tree, CIFAR-10/100 batches, generated ``shapes``.

Every datamodule yields batches ``{"image": float [B, 3, S, S], "label": long [B], "id": list}``
(``label`` is -1 for unlabelled prediction images, ``id`` a file path or ``<batch file>:<index>``),
normalised with the ImageNet statistics. ``val`` serves validation and test, as usual for
ImageNet/CIFAR. Under DDP each rank reads its own shard (see :mod:`datamodules.sampler`):
training is shuffled by :class:`~torch.utils.data.DistributedSampler`, evaluation takes samples
``r, r + W, ...`` so every sample is scored exactly once.
"""

# No ``from __future__ import annotations``: the ranges must reach jsonargparse
# (datamodules.bounds).

import pickle
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from .bounds import (
    AtLeast8,
    AtLeast16,
    NonNegativeInt,
    PositiveFraction,
    PositiveInt,
    check_bounds,
    require,
)
from .files import IMAGE_EXTENSIONS, data_dir, visible, write_once
from .sampler import ShardedSampler, rank_and_world_size
from .shapes import GENERATOR_VERSION, SHAPE_CLASSES, render_scene
from .source import missing_path_error, open_image
from .splits import NUM_FOLDS, pascal_novel_classes
from .transforms import IMAGENET_MEAN, IMAGENET_STD

Split = Literal["train", "val"]
IMAGEFOLDER_LAYOUT = """\
<root>/
  train/<class name>/<image>.jpg|png|...   one folder per class, at least one image each
  val/<class name>/<image>.jpg|png|...     the same class names (a subset is allowed)"""
# Larger objects than the segmentation scenes' 12-28%: more boundary pixels make shape, not only
# colour, learnable within a CPU-minutes run.
OBJECT_AREA = (0.25, 0.4)
CLASSIFICATION_VERSION = 1  # bump when the classification images change
CIFAR_LAYOUT = """\
<root>/  (or its cifar-10-batches-py/ or cifar-100-python/ folder)
  CIFAR-10:  data_batch_1 .. data_batch_5, test_batch, batches.meta
  CIFAR-100: train, test, meta
  (the python-batch pickles of https://www.cs.toronto.edu/~kriz/cifar.html)"""


def train_transform(size: int, scale: tuple[float, float]) -> v2.Compose:
    """Random resized crop of ``size`` covering ``scale`` of the image, horizontal flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(size: int, crop_ratio: float) -> v2.Compose:
    """Resize the shorter side to ``size / crop_ratio`` and center-crop ``size`` (ImageNet
    evaluation: 256 -> 224 is ``crop_ratio = 0.875``)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size / crop_ratio), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFiles(Dataset):
    """Images read from ``(path, label)`` pairs; a corrupt file raises naming itself."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        image = tv_tensors.Image(torch.from_numpy(open_image(path)).permute(2, 0, 1))
        return {"image": self.transform(image), "label": label, "id": str(path)}


class ImageArray(Dataset):
    """Images held in memory as ``uint8 [N, H, W, 3]`` (CIFAR)."""

    def __init__(
        self, images: np.ndarray, labels: Sequence[int], ids: Sequence[str], transform: Callable
    ) -> None:
        self.images, self.labels, self.ids = images, list(labels), list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = tv_tensors.Image(torch.from_numpy(self.images[index]).permute(2, 0, 1))
        return {"image": self.transform(image), "label": self.labels[index], "id": self.ids[index]}


class ShardSampler(ShardedSampler):
    """Indices ``rank, rank + world_size, ...``: each sample once over all ranks, no padding."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size)
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def image_files(folder: Path) -> list[Path]:
    """The images directly inside ``folder``, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if visible(p) and p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_image_folder(
    root: Path, split: Split, class_names: Sequence[str]
) -> list[tuple[Path, int]]:
    """``(path, label)`` of every image of ``root/split``; labels index ``class_names``."""
    folder = root / split
    if not folder.is_dir():
        raise missing_path_error(folder, f"{split} folder", IMAGEFOLDER_LAYOUT)
    classes = sorted(p.name for p in folder.iterdir() if visible(p) and p.is_dir())
    unknown = [name for name in classes if name not in class_names]
    if unknown:
        raise ValueError(
            f"{folder} has class folders {unknown} that train/ lacks; expected a subset of "
            f"{list(class_names)}"
        )
    if not classes:
        raise ValueError(f"{folder} has no class folders\nExpected layout:\n{IMAGEFOLDER_LAYOUT}")
    samples = []
    for name in classes:
        files = image_files(folder / name)
        if not files:
            raise ValueError(
                f"class folder {folder / name} holds no images (extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        samples += [(path, class_names.index(name)) for path in files]
    return samples


class ClassificationDataModule(LightningDataModule):
    """Train/val image classification data; subclasses say where the images come from.

    Args:
        root: dataset root (layout per subclass).
        image_size: square side of the network input.
        batch_size: images per batch (per process under DDP).
        num_workers: loader worker processes.
        crop_scale: area range of the training :class:`~torchvision.transforms.v2.RandomResizedCrop`
            (torchvision's ImageNet recipe: ``(0.08, 1.0)``).
        crop_ratio: evaluation center crop as a share of the resized shorter side.
        predict_dir: a folder of images (searched recursively) to predict on; ``None`` = the
            val split.
    """

    num_classes: int
    class_names: list[str]

    def __init__(
        self,
        root: str | None = None,
        image_size: AtLeast8 = 224,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 4,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: PositiveFraction = 0.875,
        predict_dir: str | None = None,
    ) -> None:
        check_bounds(ClassificationDataModule.__init__, dict(locals()))
        super().__init__()
        low, high = crop_scale
        require("crop_scale", crop_scale, 0 < low <= high <= 1, "(low, high), 0 < low <= high <= 1")
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else self.default_root()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir is not None else None
        self._datasets: dict[str, Dataset] = {}

    def default_root(self) -> Path:
        """Root used when ``root`` is ``None``; datasets without a default require ``root``."""
        raise ValueError(f"{type(self).__name__} needs a root folder: pass --data.root")

    @abstractmethod
    def make_dataset(self, split: Split, transform: Callable) -> Dataset:
        """The ``train`` or ``val`` split; raises naming missing or bad files."""

    def transform(self, train: bool) -> v2.Compose:
        if train:
            return train_transform(self.image_size, self.crop_scale)
        return eval_transform(self.image_size, self.crop_ratio)

    def predict_dataset(self) -> Dataset:
        """The images under ``predict_dir``, unlabelled (-1)."""
        folder = self.predict_dir
        if folder is None or not folder.is_dir():
            raise FileNotFoundError(f"prediction folder not found: {folder}")
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"prediction folder {folder} holds no images")
        return ImageFiles([(path, -1) for path in files], self.transform(train=False))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self._datasets:
            self._datasets["train"] = self.make_dataset("train", self.transform(train=True))
        if "val" not in self._datasets and (stage != "predict" or self.predict_dir is None):
            self._datasets["val"] = self.make_dataset("val", self.transform(train=False))
        if stage == "predict" and self.predict_dir is not None:
            self._datasets["predict"] = self.predict_dataset()

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            raise RuntimeError(f"call setup() before asking for the {split!r} split")
        return self._datasets[split]

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        rank, world_size = rank_and_world_size(self.trainer)
        sampler: Sampler[int]
        if split == "train":
            seed = torch.initial_seed()  # set by Lightning's seed_everything
            if self.trainer is not None:
                seed = self.trainer.strategy.broadcast(seed, src=0)
            sampler = DistributedSampler(
                dataset, world_size, rank, shuffle=True, seed=seed, drop_last=world_size > 1
            )
        else:
            sampler = ShardSampler(len(dataset), rank, world_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=split == "train" and len(sampler) > self.batch_size,
            persistent_workers=self.num_workers > 0 and split in ("train", "val"),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("val")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if self.predict_dir is not None else "val")


class ImageFolderData(ClassificationDataModule):
    """An ImageFolder tree (layout in :data:`IMAGEFOLDER_LAYOUT`): class ``i`` is the ``i``-th
    folder of ``train/`` in sorted order, as torchvision's ``ImageFolder``.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.class_names = self.find_classes()
        self.num_classes = len(self.class_names)

    def find_classes(self) -> list[str]:
        """The class folders of ``train/``; raises with the layout if the tree is not there."""
        if not self.root.is_dir():
            raise missing_path_error(self.root, "dataset root", IMAGEFOLDER_LAYOUT)
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise missing_path_error(self.root / split, f"{split} folder", IMAGEFOLDER_LAYOUT)
        names = sorted(p.name for p in (self.root / "train").iterdir() if visible(p) and p.is_dir())
        if len(names) < 2:
            raise ValueError(
                f"{self.root / 'train'} has {len(names)} class folder(s); classification needs "
                f"at least 2\nExpected layout:\n{IMAGEFOLDER_LAYOUT}"
            )
        return names

    @property
    def folder(self) -> Path:
        """The tree holding ``train/`` and ``val/``."""
        return self.root

    def make_dataset(self, split: Split, transform: Callable) -> Dataset:
        return ImageFiles(scan_image_folder(self.folder, split, self.class_names), transform)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise missing_path_error(path, "CIFAR batch file", CIFAR_LAYOUT)
    try:
        with path.open("rb") as file:
            return pickle.load(file, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"cannot read CIFAR batch file {path}: {error}") from error


class CifarData(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 (fine labels) from the python-batch pickles in a local folder.

    The variant is recognised from the meta file (``batches.meta``: CIFAR-10, ``meta``:
    CIFAR-100); ``test_batch`` / ``test`` is the val split. The files are pickles: read only
    folders you trust.

    Args:
        root: the folder holding the batches, or its parent holding ``cifar-10-batches-py/`` or
            ``cifar-100-python/`` (as torchvision downloads them).
        image_size: network input side; default the native 32.
        crop_ratio: default 1 (CIFAR is evaluated uncropped).
        crop_scale: default ``(0.35, 1.0)``, a milder crop than ImageNet's for 32-pixel images.
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: AtLeast8 = 32,
        crop_ratio: PositiveFraction = 1.0,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root, image_size=image_size, crop_ratio=crop_ratio, crop_scale=crop_scale, **kwargs
        )
        if not self.root.is_dir():
            raise missing_path_error(self.root, "dataset root", CIFAR_LAYOUT)
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (self.root / sub).is_dir():
                self.root = self.root / sub
        if (self.root / "batches.meta").is_file():
            self.variant, meta_file, names_key = "cifar10", "batches.meta", b"label_names"
            self.files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        elif (self.root / "meta").is_file():
            self.variant, meta_file, names_key = "cifar100", "meta", b"fine_label_names"
            self.files = {"train": ["train"], "val": ["test"]}
        else:
            raise missing_path_error(
                self.root / "batches.meta", "CIFAR meta file (batches.meta or meta)", CIFAR_LAYOUT
            )
        meta = _unpickle(self.root / meta_file)
        if names_key not in meta:
            raise ValueError(f"CIFAR meta file {self.root / meta_file} has no {names_key!r} entry")
        self.class_names = [name.decode() for name in meta[names_key]]
        self.num_classes = len(self.class_names)

    def make_dataset(self, split: Split, transform: Callable) -> Dataset:
        labels_key = b"labels" if self.variant == "cifar10" else b"fine_labels"
        images, labels, ids = [], [], []
        for name in self.files[split]:
            path = self.root / name
            batch = _unpickle(path)
            data = np.asarray(batch.get(b"data", ()), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels_key not in batch:
                raise ValueError(
                    f"CIFAR batch file {path}: expected b'data' uint8 [N, 3072] and "
                    f"{labels_key!r}, got data of shape {data.shape} and keys {sorted(batch)}"
                )
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += [int(label) for label in batch[labels_key]]
            ids += [f"{name}:{index:05d}" for index in range(len(data))]
        bad = sorted({label for label in labels if not 0 <= label < self.num_classes})
        if len(labels) != len(ids) or bad:
            raise ValueError(
                f"CIFAR {split} batches in {self.root}: {len(ids)} images, {len(labels)} labels, "
                f"labels outside 0..{self.num_classes - 1}: {bad[:10]}"
            )
        return ImageArray(np.concatenate(images), labels, ids, transform)


def shapes_class_folder(class_id: int) -> str:
    """``07_blue_triangle``: sorts in class order, so ImageFolder labels keep the order."""
    return f"{class_id:02d}_" + SHAPE_CLASSES[class_id].name.replace(" ", "_")


def write_shapes_classification(
    folder: Path, classes: Sequence[int], per_class: dict[str, int], size: int, seed: int
) -> None:
    """One object of the class per image (any position and rotation) on the segmentation set's
    backgrounds.

    Image ``k`` of class ``c`` in split ``s`` depends only on ``(seed, s, c, k)``, so the tree of
    a class subset is exactly that subset of the full tree.
    """
    for code, (split, count) in enumerate(per_class.items()):
        for class_id in classes:
            out = folder / split / shapes_class_folder(class_id)
            out.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([seed, code, class_id, index])
                image, _ = render_scene(rng, size, size, class_ids=[class_id], area=OBJECT_AREA)
                Image.fromarray(image).save(out / f"{index:05d}.jpg", quality=90)


class ShapesClassification(ImageFolderData):
    """The embedded ``shapes`` classes as a classification set, written on first use.

    Images come from the segmentation set's generator (:func:`datamodules.shapes.render_scene`):
    one object of the class per image on a textured background. The tree lands in
    ``<root>/v<version>-seed<seed>-<train>-<val>-<size>[-base<fold>]/{train,val}/<class>/``.

    Args:
        root: cache folder of generated trees; ``None`` = ``data_dir()/shapes-classification``.
        base_only_fold: keep only the base classes of this PASCAL-5i-style fold (its 5 novel
            classes are never written), so a backbone pretrained here has not seen the novel
            classes of that fold's few-shot segmentation test.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        scene_size: side of the generated images.
        data_seed: seed of the generator.
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        base_only_fold: int | None = None,
        train_per_class: PositiveInt = 150,
        val_per_class: PositiveInt = 25,
        scene_size: AtLeast16 = 48,
        data_seed: int = 0,
        image_size: AtLeast8 = 48,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        **kwargs: Any,
    ) -> None:
        require(
            "base_only_fold",
            base_only_fold,
            base_only_fold is None or base_only_fold in range(NUM_FOLDS),
            f"None or one of {list(range(NUM_FOLDS))}",
        )
        check_bounds(ShapesClassification.__init__, dict(locals()))
        novel = pascal_novel_classes(base_only_fold) if base_only_fold is not None else []
        self.classes = [c for c in range(len(SHAPE_CLASSES)) if c not in novel]
        self.base_only_fold = base_only_fold
        self.per_class = {"train": train_per_class, "val": val_per_class}
        self.scene_size = scene_size
        self.data_seed = data_seed
        super().__init__(root, image_size=image_size, crop_scale=crop_scale, **kwargs)

    def default_root(self) -> Path:
        return data_dir() / "shapes-classification"

    def generate(self) -> Path:
        """The generated ImageFolder tree, written first if missing."""
        version = f"v{GENERATOR_VERSION}.{CLASSIFICATION_VERSION}"
        name = f"{version}-seed{self.data_seed}-{self.per_class['train']}-{self.per_class['val']}"
        name += f"-{self.scene_size}"
        if self.base_only_fold is not None:
            name += f"-base{self.base_only_fold}"
        return write_once(
            self.root / name,
            lambda folder: write_shapes_classification(
                folder, self.classes, self.per_class, self.scene_size, self.data_seed
            ),
        )

    @property
    def folder(self) -> Path:
        return self.generate()

    def find_classes(self) -> list[str]:
        """Known without generating: the kept classes' folder names."""
        return [shapes_class_folder(c) for c in self.classes]

    def prepare_data(self) -> None:
        """Write the tree once, on one process per node, before any rank reads it."""
        self.generate()
