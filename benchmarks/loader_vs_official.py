"""This project's few-shot loaders against PFENet's own, per core, on PASCAL-sized JPEGs.

On a generated VOC-like tree (:mod:`benchmarks.voc_like`: 500 x 375 and 375 x 500 quality-90
JPEGs, textured, 1-3 objects, PNG labels), in one process with one thread (torch and OpenCV),
rounds alternating so that machine noise hits every side alike, loaders without workers:

* PFENet: a transcription of ``util/dataset.py`` ``SemData`` and ``util/transform.py`` (RandScale,
  RandRotate p=0.5, RandomGaussianBlur, RandomHorizontalFlip, Crop('rand') with its foreground
  retries, ToTensor, Normalize; evaluation ``Resize`` to 473 on a zero canvas) from the official
  repository dvlab-research/PFENet (``train.py``'s transform lists), kept here only to time it;
* this project: ``datamodules.PascalFewShot`` under ``--data.protocol pfenet`` (PFENet's own
  augmentation rule and test geometry) and under ``clean``, 473 px.

Both sides use the same batch size and PyTorch's ``DataLoader`` with its default collation
(PFENet) or the project's ``collate_episodes``.

    python -m benchmarks.loader_vs_official --shots 1 5
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import describe, markdown_row, markdown_table
from benchmarks.voc_like import write_voc_like_tree
from datamodules import PascalFewShot
from datamodules.protocols import NODUPLICATE_LIST

VALUE_SCALE = 255
MEAN = [item * VALUE_SCALE for item in (0.485, 0.456, 0.406)]
STD = [item * VALUE_SCALE for item in (0.229, 0.224, 0.225)]


# --- PFENet's util/transform.py (transcribed; the classes train.py uses) ------------------------


class RandScale:
    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        factor = self.scale[0] + (self.scale[1] - self.scale[0]) * random.random()
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        return image, label


def rotate(
    image: np.ndarray, label: np.ndarray, angle: float, padding: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``RandRotate``'s warp: about the centre, canvas kept, ``padding`` / 255 filled."""
    h, w = label.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    warped = [
        cv2.warpAffine(pixels, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=fill)
        for pixels, flags, fill in ((image, cv2.INTER_LINEAR, padding),
                                    (label, cv2.INTER_NEAREST, 255))
    ]  # fmt: skip
    return warped[0], warped[1]


class RandRotate:
    def __init__(self, rotate: tuple[float, float], padding: list[float], p: float = 0.5) -> None:
        self.rotate, self.padding, self.p = rotate, padding, p

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if random.random() < self.p:
            angle = self.rotate[0] + (self.rotate[1] - self.rotate[0]) * random.random()
            image, label = rotate(image, label, angle, self.padding)
        return image, label


class RandomGaussianBlur:
    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if random.random() < 0.5:
            image = cv2.GaussianBlur(image, (5, 5), 0)
        return image, label


class RandomHorizontalFlip:
    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if random.random() < 0.5:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        return image, label


class Crop:
    """``Crop(crop_type='rand')`` with mean padding, centred, and up to 31 redraws while the
    crop keeps under 85% of the foreground."""

    def __init__(self, size: int, padding: list[float]) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        pad_h_half, pad_w_half = int(pad_h / 2), int(pad_w / 2)
        if pad_h > 0 or pad_w > 0:
            image = cv2.copyMakeBorder(
                image,
                pad_h_half,
                pad_h - pad_h_half,
                pad_w_half,
                pad_w - pad_w_half,
                cv2.BORDER_CONSTANT,
                value=self.padding,
            )
            label = cv2.copyMakeBorder(
                label,
                pad_h_half,
                pad_h - pad_h_half,
                pad_w_half,
                pad_w - pad_w_half,
                cv2.BORDER_CONSTANT,
                value=255,
            )
        h, w = label.shape
        raw_image, raw_label = image, label
        h_off, w_off = random.randint(0, h - self.size), random.randint(0, w - self.size)
        image = image[h_off : h_off + self.size, w_off : w_off + self.size]
        label = label[h_off : h_off + self.size, w_off : w_off + self.size]
        raw_pos_num, pos_num, crop_cnt = np.sum(raw_label == 1), np.sum(label == 1), 0
        while pos_num < 0.85 * raw_pos_num and crop_cnt <= 30:
            h_off, w_off = random.randint(0, h - self.size), random.randint(0, w - self.size)
            image = raw_image[h_off : h_off + self.size, w_off : w_off + self.size]
            label = raw_label[h_off : h_off + self.size, w_off : w_off + self.size]
            raw_pos_num, pos_num = np.sum(raw_label == 1), np.sum(label == 1)
            crop_cnt += 1
        return image, label  # fmt: skip


class Resize:
    """Evaluation ``Resize``: longer side to ``size``, ``int()`` then floored to a multiple of 8,
    pasted top-left on a zero canvas; the label on a 255 canvas."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _new_hw(self, ori_h: int, ori_w: int) -> tuple[int, int]:
        if ori_h >= ori_w:
            new_h, new_w = self.size, int(ori_w * (self.size * 1.0 / ori_h))
        else:
            new_h, new_w = int(ori_h * (self.size * 1.0 / ori_w)), self.size
        return int(new_h / 8) * 8, int(new_w / 8) * 8

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new_h, new_w = self._new_hw(*image.shape[:2])
        crop = cv2.resize(image, dsize=(new_w, new_h), interpolation=cv2.INTER_LINEAR)
        back = np.zeros((self.size, self.size, 3))
        back[:new_h, :new_w, :] = crop
        s_mask = cv2.resize(label.astype(np.float32), dsize=(new_w, new_h),
                            interpolation=cv2.INTER_NEAREST)  # fmt: skip
        back_mask = np.ones((self.size, self.size)) * 255
        back_mask[:new_h, :new_w] = s_mask
        return back, back_mask


class ToTensorNormalize:
    """``ToTensor`` (float image CHW, long label) then ``Normalize`` channel by channel."""

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = torch.from_numpy(image.transpose((2, 0, 1)))
        if not isinstance(tensor, torch.FloatTensor):
            tensor = tensor.float()
        target = torch.from_numpy(label)
        if not isinstance(target, torch.LongTensor):
            target = target.long()
        for channel, mean, std in zip(tensor, MEAN, STD, strict=True):
            channel.sub_(mean).div_(std)
        return tensor, target


class Compose:
    def __init__(self, transforms: list[Any]) -> None:
        self.transforms = transforms

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Any:
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label


def pfenet_train_transform(size: int, scale: tuple[float, float]) -> Compose:
    """``train.py``'s list: RandScale, RandRotate([-10, 10]), blur, flip, Crop, tensor."""
    return Compose([RandScale(scale), RandRotate((-10, 10), MEAN), RandomGaussianBlur(),
                    RandomHorizontalFlip(), Crop(size, MEAN), ToTensorNormalize()])  # fmt: skip


def pfenet_val_transform(size: int) -> Compose:
    return Compose([Resize(size), ToTensorNormalize()])


# --- PFENet's util/dataset.py SemData (PASCAL) --------------------------------------------------


class SemData(Dataset):
    """``SemData`` for PASCAL-5i: the filtered list (2 * 32 * 32 pixels per class), one episode
    per listed image, the class drawn among those present, supports of that class."""

    def __init__(self, split: int, shot: int, root: Path, data_list: Path, transform: Compose,
                 mode: str) -> None:  # fmt: skip
        val = list(range(5 * split + 1, 5 * split + 6))
        self.sub_list = [c for c in range(1, 21) if c not in val]
        self.sub_val_list = val
        self.mode, self.shot, self.transform = mode, shot, transform
        classes = self.sub_list if mode == "train" else self.sub_val_list
        self.data_list: list[tuple[str, str]] = []
        self.sub_class_file_list: dict[int, list[tuple[str, str]]] = {c: [] for c in classes}
        for line in data_list.read_text().splitlines():
            fields = line.split()
            if len(fields) == 1:
                fields = [f"JPEGImages/{fields[0]}.jpg", f"SegmentationClassAug/{fields[0]}.png"]
            item = (str(root / fields[0]), str(root / fields[1]))
            label = cv2.imread(item[1], cv2.IMREAD_GRAYSCALE)
            present = [c for c in np.unique(label).tolist() if c not in (0, 255)]
            kept = [c for c in present if c in classes and (label == c).sum() >= 2 * 32 * 32]
            if kept:
                self.data_list.append(item)
                for c in kept:
                    self.sub_class_file_list[c].append(item)

    def __len__(self) -> int:
        return len(self.data_list)

    @staticmethod
    def _read(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)
        image = np.float32(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        return image, cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)

    @staticmethod
    def _binary(label: np.ndarray, class_chosen: int) -> np.ndarray:
        target_pix, ignore_pix = np.where(label == class_chosen), np.where(label == 255)
        label[:, :] = 0
        label[target_pix[0], target_pix[1]] = 1
        label[ignore_pix[0], ignore_pix[1]] = 255
        return label

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image_path, label_path = self.data_list[index]
        image, label = self._read(image_path, label_path)
        classes = self.sub_list if self.mode == "train" else self.sub_val_list
        label_class = [c for c in np.unique(label).tolist() if c in classes]
        class_chosen = label_class[random.randint(1, len(label_class)) - 1]
        label = self._binary(label, class_chosen)
        files = self.sub_class_file_list[class_chosen]
        chosen: list[int] = []
        for _ in range(self.shot):
            support_idx, support = random.randint(1, len(files)) - 1, (image_path, label_path)
            while support == (image_path, label_path) or support_idx in chosen:
                support_idx = random.randint(1, len(files)) - 1
                support = files[support_idx]
            chosen.append(support_idx)
        supports = []
        for support_idx in chosen:
            s_image, s_label = self._read(*files[support_idx])
            supports.append((s_image, self._binary(s_label, class_chosen)))
        raw_label = label.copy()
        image, label = self.transform(image, label)
        supports = [self.transform(s_image, s_label) for s_image, s_label in supports]
        s_x = torch.stack([s for s, _ in supports])
        s_y = torch.stack([s for _, s in supports])
        subcls = [classes.index(class_chosen)] * self.shot
        if self.mode == "train":
            return image, label, s_x, s_y, subcls
        return image, label, s_x, s_y, subcls, raw_label


# --- timing -------------------------------------------------------------------------------------


def batches_forever(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def episodes_in(batch: Any) -> int:
    first = batch["query_image"] if isinstance(batch, dict) else batch[0]
    return first.shape[0]


def time_rounds(loaders: dict[str, DataLoader], batches: int, rounds: int) -> dict[str, float]:
    """Median episodes/s of each loader over ``rounds`` rounds of ``batches`` batches, the
    loaders taking turns within each round (one warm-up batch each first)."""
    streams = {name: batches_forever(loader) for name, loader in loaders.items()}
    for stream in streams.values():
        next(stream)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, stream in streams.items():
            start, episodes = time.perf_counter(), 0
            for batch in itertools.islice(stream, batches):
                episodes += episodes_in(batch)
            rates[name].append(episodes / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def project_loaders(root: Path, cache: Path, protocol: str, shots: int, args: argparse.Namespace
                    ) -> dict[str, DataLoader]:  # fmt: skip
    def datamodule(batch_size: int) -> PascalFewShot:
        return PascalFewShot(root=str(root), cache_dir=str(cache), protocol=protocol,
                             shots=shots, image_size=args.size, batch_size=batch_size,
                             num_workers=0, train_episodes=10_000, val_fraction=0.3)  # fmt: skip

    train, test = datamodule(args.batch_size), datamodule(args.test_batch_size)
    train.setup("fit")
    test.setup("test")
    return {"train": train.train_dataloader(), "test": test.test_dataloader()[0]}


def official_loaders(root: Path, shots: int, args: argparse.Namespace) -> dict[str, DataLoader]:
    scale = (0.9, 1.1)
    train = SemData(0, shots, root, root / NODUPLICATE_LIST,
                    pfenet_train_transform(args.size, scale), "train")  # fmt: skip
    test = SemData(0, shots, root, root / "ImageSets/Segmentation/val.txt",
                   pfenet_val_transform(args.size), "val")  # fmt: skip
    return {
        "train": DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True),
        "test": DataLoader(test, batch_size=args.test_batch_size, shuffle=False),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="tree to reuse (default: a fresh temp dir)")
    parser.add_argument("--images", type=int, nargs=2, default=[400, 150], help="train, test")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (both sides)")
    parser.add_argument("--test-batch-size", type=int, default=1, help="PFENet tests at 1")
    parser.add_argument("--batches", type=int, default=4, help="batches per loader per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocols", nargs="+", default=["pfenet", "clean"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(321)
    base = Path(args.root or tempfile.mkdtemp(prefix="voc-like-"))
    root = write_voc_like_tree(base / "VOC2012", *args.images)
    machine = describe(torch.device("cpu"))
    print(f"# {args.images[0]}+{args.images[1]} generated VOC-like JPEGs (500x375/375x500, q90) "
          f"at {root}; {args.size} px, train batch {args.batch_size}, test batch "
          f"{args.test_batch_size}, no workers, 1 thread; {machine}")  # fmt: skip
    header = ["loader", "shots", "PFENet ep/s", *[f"project {p} ep/s" for p in args.protocols],
              *[f"{p} / PFENet" for p in args.protocols]]  # fmt: skip
    print(markdown_table(header), flush=True)
    for shots in args.shots:
        loaders = {f"official {k}": v for k, v in official_loaders(root, shots, args).items()}
        for protocol in args.protocols:
            cache = base / "cache"
            mine = project_loaders(root, cache, protocol, shots, args)
            loaders.update({f"{protocol} {k}": v for k, v in mine.items()})
        rates = time_rounds(loaders, args.batches, args.rounds)
        for stage in ("train", "test"):
            official = rates[f"official {stage}"]
            ours = [rates[f"{p} {stage}"] for p in args.protocols]
            ratios = [f"{rate / official:.2f}x" for rate in ours]
            cells = [stage, shots, f"{official:.1f}", *[f"{r:.1f}" for r in ours], *ratios]
            print(markdown_row(cells), flush=True)


if __name__ == "__main__":
    main()
