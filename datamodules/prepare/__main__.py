"""``python -m datamodules.prepare {pascal,coco} ...`` (see :mod:`datamodules.prepare`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..files import data_dir, writable_folder
from .coco import check_inputs, prepare_coco
from .common import PrepareError
from .pascal import SBD, VOC, given_archive, prepare_pascal


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m datamodules.prepare",
        description="Build the PASCAL-5i tree or the COCO-20i label PNGs from the published files.",
    )
    commands = main.add_subparsers(dest="dataset", required=True)
    pascal = commands.add_parser(
        "pascal", help="VOC2012 + SBD -> SegmentationClassAug and the lists of every preset"
    )
    pascal.add_argument("--out", type=Path, required=True, help="the VOC2012 tree to build")
    pascal.add_argument("--voc-tar", type=Path, help=f"{VOC.filename} ({VOC.size})")
    pascal.add_argument("--sbd-tgz", type=Path, help=f"SBD's {SBD.filename} ({SBD.size})")
    pascal.add_argument(
        "--download",
        action="store_true",
        help="download the archives not given (md5 checked) into --downloads",
    )
    pascal.add_argument(
        "--downloads",
        type=Path,
        default=None,
        help="where downloaded archives go (default: $FEWSHOT_DATA_DIR/downloads)",
    )
    coco = commands.add_parser("coco", help="COCO 2014 instances JSON -> one label PNG per image")
    coco.add_argument(
        "--root", type=Path, required=True, help="COCO 2014: train2014/, val2014/, annotations/"
    )
    coco.add_argument(
        "--out", type=Path, default=None, help="where the PNGs go (default: <root>/annotations)"
    )
    coco.add_argument("--splits", nargs="+", default=["train2014", "val2014"])
    coco.add_argument("--workers", type=int, default=1, help="rendering processes")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.dataset == "pascal":  # inputs first: a typo leaves no empty --out behind
            given_archive(args.voc_tar, "--voc-tar", VOC)
            given_archive(args.sbd_tgz, "--sbd-tgz", SBD)
        else:
            check_inputs(args.root, [])  # the splits: prepare_coco, for those it renders
        if args.out is not None:
            writable_folder(args.out, "--out", "the prepared data")
        if args.dataset == "pascal":
            downloads = (args.downloads or data_dir() / "downloads") if args.download else None
            prepare_pascal(args.out, args.voc_tar, args.sbd_tgz, downloads)
        else:
            prepare_coco(args.root, args.out, tuple(args.splits), args.workers)
    except (PrepareError, OSError) as error:  # an input, or the storage (named by the error)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
