"""COCO-20i label PNGs rendered once from the COCO 2014 instance annotations.

The rendering is :class:`datamodules.coco.CocoInstancesSource`'s, so a training run on the PNGs
sees exactly the labels it would rasterise from the JSON: 0 background, ``1..80`` the
categories in category-id order, instances painted largest first, crowd regions not covered by
an instance 255 (``coco_crowd`` then decides: ignored, or background under ``hsnet``). The
layout is the one :class:`datamodules.CocoFewShot` reads with ``masks=`` and HSNet reads
(``annotations/{train,val}2014/<file name>.png``, juhongm999/hsnet ``data/coco.py``), so by
default the PNGs go to ``<root>/annotations`` and ``--data.masks annotations`` reads them.

The record lists the splits rendered and their image counts; it is written once all the splits
of a run are rendered, and rewritten first to the splits whose folders still hold the counted
non-empty PNGs. A run renders the requested splits it does not list: the ones never rendered, and
those that lost files since. An existing PNG is kept only when it is complete and of its image's
size, so only the missing, empty or broken ones are rendered again.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from ..coco import CocoInstancesSource
from .common import (
    Log,
    PrepareError,
    count_files,
    encode_label_png,
    image_shape,
    png_shape,
    read_record,
    remove_partial_files,
    remove_record,
    write_bytes,
    write_record,
)

SPLITS = ("train2014", "val2014")

_source: CocoInstancesSource | None = None  # the forked workers' copy (read-only)
_folder: Path | None = None


def render(image_id: str, source: CocoInstancesSource, folder: Path) -> bool:
    """Write ``folder/<image id>.png`` unless a complete PNG of the image's size is there;
    ``True`` when written."""
    target = folder / f"{image_id}.png"
    image = source.image_path(image_id)
    if not image.is_file():
        raise PrepareError(f"image {image} of {source.annotation_file} not found")
    size = image_shape(image)
    if png_shape(target) == size:
        return False
    try:
        label = source.read_label(image_id)  # validated: 0..80 and 255
    except ValueError as error:  # a bad annotation, named by the message
        raise PrepareError(str(error)) from error
    if size != label.shape:
        raise PrepareError(
            f"image {image} is {size} but {source.annotation_file} says {label.shape} "
            "(height, width)"
        )
    write_bytes(target, encode_label_png(label))
    return True


def _render_in_worker(image_id: str) -> bool:
    assert _source is not None and _folder is not None
    return render(image_id, _source, _folder)


def prepare_split(root: Path, out: Path, split: str, workers: int, log: Log) -> dict[str, int]:
    """Render every image of ``split`` (those without annotations too: all background, as the
    JSON loader sees them) into ``out/split``."""
    global _source, _folder
    annotations = root / "annotations" / f"instances_{split}.json"
    log(f"reading {annotations}")
    try:
        source = CocoInstancesSource(f"coco-{split}", root / split, annotations)
    except (FileNotFoundError, ValueError) as error:
        raise PrepareError(str(error)) from error
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    ids = source.ids
    log(f"rendering {len(ids)} label maps of {split} into {folder} ({workers} workers)")
    if workers > 1:
        _source, _folder = source, folder
        try:
            context = multiprocessing.get_context("fork")
            with context.Pool(workers) as pool:
                written = sum(pool.imap(_render_in_worker, ids, chunksize=64))
        finally:
            _source = _folder = None
    else:
        written = sum(render(image_id, source, folder) for image_id in ids)
    return {"images": len(ids), "written": written}


def check_inputs(root: Path, splits: list[str]) -> None:
    """The folders and JSON files of ``splits``, checked before any is read: a missing val2014
    JSON would otherwise show only after train2014 is rendered (minutes)."""
    if not root.is_dir():
        raise PrepareError(
            f"--root {root} is not a folder (expected COCO 2014: train2014/, val2014/, "
            "annotations/instances_*.json)"
        )
    for split in splits:
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            raise PrepareError(
                f"annotation file not found: {annotations} (expected COCO 2014's "
                "annotations_trainval2014.zip unzipped into --root)"
            )
        if not (root / split).is_dir():
            raise PrepareError(
                f"image folder not found: {root / split} (expected {split}.zip unzipped into "
                "--root)"
            )


def rendered_splits(out: Path, log: Log) -> dict[str, int]:
    """The splits the record of ``out`` lists whose folders still hold every label map (counted,
    not opened) -> their image counts; the record is rewritten to these alone, so that it never
    claims a split that is not all there."""
    record = read_record(out, "coco")
    if record is None:
        return {}
    complete: dict[str, int] = {}
    for split, images in sorted(record["counts"].items()):
        found = count_files(out / split, ".png")
        if found >= images:
            complete[split] = images
        else:
            log(f"{out / split} holds {found} of the {images} label maps recorded: not done")
    if complete != record["counts"]:
        if complete:
            write_record(out, "coco", coco_record(complete))
        else:
            remove_record(out, "coco")
    return complete


def coco_record(counts: dict[str, int]) -> dict[str, Any]:
    return {"dataset": "coco", "splits": sorted(counts), "counts": dict(sorted(counts.items()))}


def prepare_coco(
    root: Path,
    out: Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    workers: int = 1,
    log: Log = print,
) -> dict[str, Any]:
    """Render the label PNGs of COCO 2014 under ``root`` into ``out`` (default
    ``root/annotations``, HSNet's layout); returns the record of ``out/.prepared-coco.json``."""
    root = Path(root)
    out = Path(out) if out is not None else root / "annotations"
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise PrepareError(f"splits {unknown}: expected some of {list(SPLITS)}")
    counts = rendered_splits(out, log)
    todo = [split for split in dict.fromkeys(splits) if split not in counts]
    if not todo:
        log(f"{out} is already prepared ({counts}); nothing to do")
        return coco_record(counts)
    check_inputs(root, todo)
    out.mkdir(parents=True, exist_ok=True)
    for split in todo:
        removed = remove_partial_files(out / split)
        if removed:
            log(f"resuming: removed {removed} partial files of an interrupted run")
    written: dict[str, int] = {}
    for split in todo:
        result = prepare_split(root, out, split, workers, log)
        counts[split], written[split] = result["images"], result["written"]
    write_record(out, "coco", coco_record(counts))
    relative = out.relative_to(root) if out.is_relative_to(root) else out
    log(
        f"COCO label maps ready in {out}: {dict(sorted(counts.items()))}; written this run: "
        f"{written}. Train with --data datamodules.CocoFewShot --data.root {root} --data.masks "
        f"{relative}"
    )
    return coco_record(counts)
