"""What the preparation steps share: their error, the finished-tree record, PNG writing and the
checks of what an earlier run left."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_file, write_atomic

Log = Callable[[str], None]
RECORD_VERSION = 1


class PrepareError(RuntimeError):
    """A preparation input is missing, corrupt or not the published one (the message says which
    and what was expected)."""


def record_path(out: Path, dataset: str) -> Path:
    return out / f".prepared-{dataset}.json"


def read_record(out: Path, dataset: str) -> dict[str, Any] | None:
    """The record of a finished preparation of ``dataset`` in ``out``, if there is one."""
    path = record_path(out, dataset)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a record is written atomically; an unreadable one is not ours: redo
    return record if record.get("version") == RECORD_VERSION else None


def write_record(out: Path, dataset: str, record: dict[str, Any]) -> None:
    """The finished-tree record, last: its presence means every other file is complete."""
    text = json.dumps({"version": RECORD_VERSION, **record}, indent=1, sort_keys=True)
    write_atomic(record_path(out, dataset), text + "\n")


def remove_record(out: Path, dataset: str) -> None:
    """Unmark a tree found incomplete before rebuilding it, so that a failed rebuild leaves no
    record claiming a finished tree."""
    record_path(out, dataset).unlink(missing_ok=True)


def count_files(folder: Path, suffix: str) -> int:
    """The non-empty visible files of ``folder`` ending in ``suffix``, counted without opening
    one (a stat each), so checking a finished tree stays instant; a 0-byte file is a failed
    copy, not an output."""
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as entries:
        return sum(
            entry.name.endswith(suffix)
            and not entry.name.startswith(".")
            and entry.is_file()
            and entry.stat().st_size > 0
            for entry in entries
        )


def non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def png_shape(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of the complete PNG at ``path``; ``None`` when it is missing, empty,
    truncated or not a PNG. Checked (chunk checksums, no decoding: microseconds) before an
    earlier run's output is kept: such a file is rendered again, never trusted."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return None
            image.verify()
            return image.height, image.width
    except (OSError, SyntaxError, ValueError):  # PIL's errors for a broken file
        return None


def image_shape(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the header of the image at ``path``; an unreadable one is an
    error naming it."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise PrepareError(f"image {path} is not readable ({error})") from error


def remove_partial_files(folder: Path) -> int:
    """Delete the temporary ``.*.part`` files a killed run left (:func:`atomic_file`'s)."""
    count = 0
    if folder.is_dir():
        for partial in folder.rglob(".*.part"):
            partial.unlink(missing_ok=True)
            count += 1
    return count


def encode_label_png(label: np.ndarray) -> bytes:
    """A ``uint8 [H, W]`` label map as a single-channel (grayscale) PNG, as the usual
    SegmentationClassAug and HSNet's COCO masks; the same array always gives the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as file:
        file.write(data)
