"""COCO-20i label PNGs rendered once from the COCO 2014 instance annotations.

The rendering is :class:`datamodules.coco.CocoInstancesSource`'s, so a training run on the PNGs
sees exactly the labels it would rasterise from the JSON: 0 background, ``1..80`` the
categories in category-id order, instances painted largest first, crowd regions not covered by
an instance 255 (``coco_crowd`` then decides: ignored, or background under ``hsnet``). The
layout is the one :class:`datamodules.CocoFewShot` reads with ``masks=`` and HSNet reads
(``annotations/{train,val}2014/<file name>.png``, juhongm999/hsnet ``data/coco.py``), so by
default the PNGs go to ``<root>/annotations`` and ``--data.masks annotations`` reads them.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from ..coco import CocoInstancesSource
from ..source import image_size
from .common import (
    Log,
    PrepareError,
    encode_label_png,
    read_record,
    remove_partial_files,
    write_bytes,
    write_record,
)

SPLITS = ("train2014", "val2014")

_source: CocoInstancesSource | None = None  # the forked workers' copy (read-only)
_folder: Path | None = None


def render(image_id: str, source: CocoInstancesSource, folder: Path) -> bool:
    """Write ``folder/<image id>.png`` unless it exists; ``True`` when written."""
    target = folder / f"{image_id}.png"
    if target.is_file():
        return False
    image = source.image_path(image_id)
    if not image.is_file():
        raise PrepareError(f"image {image} of {source.annotation_file} not found")
    label = source.read_label(image_id)  # validated: 0..80 and 255
    if image_size(image) != label.shape:
        raise PrepareError(
            f"image {image} is {image_size(image)} but {source.annotation_file} says "
            f"{label.shape} (height, width)"
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
    record = read_record(out, "coco")
    if record is not None:
        log(f"{out} is already prepared ({record['counts']}); nothing to do")
        return record
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise PrepareError(f"splits {unknown}: expected some of {list(SPLITS)}")
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        removed = remove_partial_files(out / split)
        if removed:
            log(f"resuming: removed {removed} partial files of an interrupted run")
    counts, written = {}, {}
    for split in splits:
        result = prepare_split(root, out, split, workers, log)
        counts[split], written[split] = result["images"], result["written"]
    record = {"dataset": "coco", "splits": list(splits), "counts": counts}
    write_record(out, "coco", record)
    relative = out.relative_to(root) if out.is_relative_to(root) else out
    log(
        f"COCO label maps ready in {out}: {counts}; written this run: {written}. "
        f"Train with --data datamodules.CocoFewShot --data.root {root} --data.masks {relative}"
    )
    return record
