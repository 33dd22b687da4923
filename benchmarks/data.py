"""Episodes per second of the few-shot loaders on the generated ``shapes`` set.

Times, on this machine: generating the default set (first use only), building the class index
(first setup only) and a second setup reading the cache, then the training and test loaders
(load, decode, transform, collate) for each worker count. No model runs.

    python -m benchmarks.data --workers 0 2 --shots 1 5
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import episodes_per_second
from datamodules import ShapesFewShot


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="shapes cache (default: a fresh temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    torch.set_num_threads(1)  # loaders are process-parallel; avoid oversubscribing cores
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    fresh = ShapesFewShot(root=str(root))
    print(f"generate {fresh.num_train}+{fresh.num_test} images: "
          f"{timed(lambda: fresh.data_folder):.1f} s")  # fmt: skip
    print(f"index build (first setup): {timed(fresh.prepare_data):.2f} s")
    second = ShapesFewShot(root=str(root))
    print(f"setup from cache: {timed(lambda: (second.setup('fit'), second.setup('test'))):.3f} s")
    print(f"image_size {second.image_size}, batch {args.batch_size}; episodes/s:")
    for shots in args.shots:
        for workers in args.workers:
            dm = ShapesFewShot(
                root=str(root), shots=shots,
                batch_size=args.batch_size, num_workers=workers,
            )  # fmt: skip
            dm.setup("fit")
            dm.setup("test")
            train = episodes_per_second(dm.train_dataloader(), args.batches)
            test_loaders = dm.test_dataloader()  # one loader per test seed, or a single one
            if isinstance(test_loaders, list):
                test_loaders = test_loaders[0]
            test = episodes_per_second(test_loaders, args.batches)
            print(f"  {shots}-shot, {workers} workers: train {train:6.1f}  test {test:6.1f}")


if __name__ == "__main__":
    main()
