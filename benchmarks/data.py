"""Episodes per second of the few-shot loaders on the generated ``shapes`` set, or on COCO with
labels rasterised from the instances JSON against labels read from rendered PNGs.

Times, on this machine: generating the default set (first use only), building the class index
(first setup only) and a second setup reading the cache, then the training and test loaders
(load, decode, transform, collate) for each worker count. No model runs.

    python -m benchmarks.data --workers 0 2 --shots 1 5
    python -m benchmarks.data --dataset coco --workers 0 --shots 1 [--root COCO2014]

``--dataset coco`` without ``--root`` writes a synthetic COCO 2014 tree (``--coco-images`` per
split, 640 x 480 JPEGs, COCO's 7.3 instances per image as polygons of 16-48 vertices, a crowd
RLE in one image of ten), renders its PNGs with ``python -m datamodules.prepare coco`` (timed),
and times ``CocoFewShot`` reading the JSON and reading the PNGs (``masks=annotations``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from benchmarks.common import episodes_per_second
from datamodules import CocoDataset, CocoFewShot, ShapesFewShot
from datamodules.coco import COCO_CLASSES
from datamodules.prepare import prepare_coco


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def synthetic_coco(root: Path, images: int, seed: int = 0) -> Path:
    """A COCO 2014 tree of random polygons over smooth random images (see the docstring)."""
    rng = np.random.default_rng(seed)
    skip = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # COCO 2014's 80 ids in 1..90
    categories = [i for i in range(1, 91) if i not in skip]
    height, width = 480, 640
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(exist_ok=True)
        infos, annotations = [], []
        for index in range(images):
            name = f"COCO_{split}_{index:012d}.jpg"
            coarse = rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(
                root / split / name, quality=90
            )
            infos.append({"id": index + 1, "file_name": name, "height": height, "width": width})
            for _ in range(rng.poisson(7.3)):
                vertices = int(rng.integers(16, 49))
                angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
                radius = rng.uniform(20, 160) * rng.uniform(0.7, 1.0, vertices)
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                xs = np.clip(cx + radius * np.cos(angles), 0, width - 1)
                ys = np.clip(cy + radius * np.sin(angles), 0, height - 1)
                polygon = np.stack([xs, ys], 1).ravel().round(2).tolist()
                rle = mask_utils.frPyObjects([polygon], height, width)
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0,
                     "category_id": int(rng.choice(categories)), "segmentation": [polygon],
                     "area": float(mask_utils.area(rle).sum())}
                )  # fmt: skip
            if index % 10 == 0:
                crowd = np.zeros((height, width), dtype=np.uint8)
                crowd[: height // 3, width // 2 :] = 1
                encoded = mask_utils.encode(np.asfortranarray(crowd))
                encoded["counts"] = encoded["counts"].decode()
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 1,
                     "category_id": categories[0], "segmentation": encoded,
                     "area": float(crowd.sum())}
                )  # fmt: skip
        names = zip(categories, COCO_CLASSES, strict=True)
        content = {"images": infos, "annotations": annotations,
                   "categories": [{"id": i, "name": name} for i, name in names]}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def loader_rates(dm, batches: int) -> tuple[float, float]:
    dm.setup("fit")
    dm.setup("test")
    train = episodes_per_second(dm.train_dataloader(), batches)
    test_loaders = dm.test_dataloader()  # one loader per test seed, or a single one
    if isinstance(test_loaders, list):
        test_loaders = test_loaders[0]
    return train, episodes_per_second(test_loaders, batches)


def coco_main(args: argparse.Namespace) -> None:
    """COCO: the loaders rasterising the JSON's polygons per episode against reading PNGs,
    measured in alternation (``--rounds``; medians), since other jobs on a shared machine shift
    the numbers of two measurements taken one after the other."""
    fresh = args.root is None
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="coco-bench-"))
    cache = Path(tempfile.mkdtemp(prefix="coco-bench-index-"))
    if fresh:
        seconds = timed(lambda: synthetic_coco(root, args.coco_images))
        print(f"synthetic COCO, {args.coco_images} images per split: {seconds:.1f} s")
    seconds = timed(lambda: prepare_coco(root, log=lambda message: None))
    print(f"prepare coco (render the PNGs, 1 process): {seconds:.1f} s")
    size = args.image_size or CocoDataset.defaults["few_shot"]["image_size"]
    kinds = {"instances JSON": None, "PNG masks": "annotations"}
    settings = {
        label: {"root": str(root), "masks": masks, "cache_dir": str(cache / label),
                "val_fraction": 0.25}  # 5-shot validation pools on a small tree
        for label, masks in kinds.items()
    }  # fmt: skip
    for label in kinds:
        first = CocoFewShot(**settings[label])
        print(f"{label}: index build (first setup) {timed(first.prepare_data):.1f} s")
    sources = {label: CocoFewShot(**settings[label]).source("test") for label in kinds}
    per_label: dict[str, list[float]] = {label: [] for label in kinds}
    for _ in range(args.rounds):
        for label, source in sources.items():
            ids = source.ids[:200]
            seconds = timed(lambda source=source, ids=ids: [source.read_label(i) for i in ids])
            per_label[label].append(1000 * seconds / len(ids))
    for label, values in per_label.items():
        print(f"{label}: label map read {statistics.median(values):.2f} ms (median)")
    print(f"image_size {size}, batch {args.batch_size}, {args.rounds} alternating rounds; "
          "episodes/s (median):")  # fmt: skip
    for shots in args.shots:
        for workers in args.workers:
            modules = {
                label: CocoFewShot(
                    **settings[label], shots=shots, image_size=size,
                    batch_size=args.batch_size, num_workers=workers,
                )
                for label in kinds
            }  # fmt: skip
            rates: dict[str, list[tuple[float, float]]] = {label: [] for label in kinds}
            for _ in range(args.rounds):
                for label, dm in modules.items():
                    rates[label].append(loader_rates(dm, args.batches))
            for label, values in rates.items():
                train = statistics.median(v[0] for v in values)
                test = statistics.median(v[1] for v in values)
                print(f"  {label}, {shots}-shot, {workers} workers: train {train:6.1f}  "
                      f"test {test:6.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["shapes", "coco"], default="shapes")
    parser.add_argument("--root", default=None, help="data root (default: a fresh temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=None, help="default: the dataset's")
    parser.add_argument("--coco-images", type=int, default=600, help="synthetic COCO, per split")
    parser.add_argument("--rounds", type=int, default=3, help="COCO: alternating measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)  # loaders are process-parallel; avoid oversubscribing cores
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    if args.dataset == "coco":
        coco_main(args)
        return
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    fresh = ShapesFewShot(root=str(root))
    shapes = fresh.dataset
    print(f"generate {shapes.num_train}+{shapes.num_test} images: "
          f"{timed(shapes.prepare):.1f} s")  # fmt: skip
    print(f"index build (first setup): {timed(fresh.prepare_data):.2f} s")
    second = ShapesFewShot(root=str(root))
    print(f"setup from cache: {timed(lambda: (second.setup('fit'), second.setup('test'))):.3f} s")
    print(f"image_size {second.image_size}, batch {args.batch_size}; episodes/s:")
    for shots in args.shots:
        for workers in args.workers:
            dm = ShapesFewShot(
                root=str(root), shots=shots, image_size=args.image_size,
                batch_size=args.batch_size, num_workers=workers,
            )  # fmt: skip
            train, test = loader_rates(dm, args.batches)
            print(f"  {shots}-shot, {workers} workers: train {train:6.1f}  test {test:6.1f}")


if __name__ == "__main__":
    main()
