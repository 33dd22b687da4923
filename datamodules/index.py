"""Class index: the pixels each class covers in each image, built once and cached on disk.

The reference repositories (PFENet, ASGNet, HSNet) re-read every mask at start-up to find which
images hold which class. Here the per-image class pixel counts are computed once, validating every
label on the way, and stored as JSON under ``cache_dir``, keyed by the source's fingerprint (its
files' paths, sizes and modification times, or its annotation file). Counts rather than
thresholded lists are stored, so one cache serves every fold, shot count, ``min_pixels`` and
protocol option.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .files import atomic_file
from .source import SegmentationSource

log = logging.getLogger(__name__)

INDEX_VERSION = 1
ClassCounts = dict[str, dict[int, int]]

#: Indexes whose cache file could not be written, kept so that a process builds (and warns
#: about) each once: ``prepare_data`` and ``setup`` both ask for them.
_unsaved: dict[Path, ClassCounts] = {}


def index_path(source: SegmentationSource, cache_dir: Path) -> Path:
    """Cache file of ``source``'s index; its name carries the fingerprint."""
    key = f"{INDEX_VERSION}:{source.fingerprint()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{source.name}-{digest}.json"


def class_counts(source: SegmentationSource, cache_dir: Path) -> ClassCounts:
    """Image id -> {0-based class: pixels} for every image of ``source``, cached on disk."""
    path = index_path(source, cache_dir)
    if path in _unsaved:
        return _unsaved[path]
    if path.is_file():
        try:
            with path.open() as file:
                stored = json.load(file)
            return {
                image_id: {int(c): n for c, n in counts.items()}
                for image_id, counts in stored.items()
            }
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as error:
            # written atomically, so damage came from outside (a copied or truncated cache)
            log.warning("class index %s is damaged (%s); rebuilding it", path, error)
    log.info("indexing %d labels of %s (once; cached at %s)", len(source.ids), source.name, path)
    counts = {image_id: source.class_pixels(image_id) for image_id in source.ids}
    if counts and not any(counts.values()):
        raise ValueError(
            f"{source.name}: no label of its {len(counts)} images marks a class pixel (only 0, "
            f"background, and 255, ignore; e.g. {source.label_origin(next(iter(counts)))}): "
            "labels hold class c as c + 1 (0 background, 255 ignore); a binary 0/255 mask "
            "marks nothing"
        )
    try:
        with atomic_file(path, "w") as file:  # concurrent ranks never see a partial file
            json.dump(counts, file)
    except OSError as error:
        log.warning(
            "class index cache %s not writable (%s); the index is rebuilt each run; pass a "
            "writable --data.cache_dir",
            path,
            error,
        )
        _unsaved[path] = counts
    return counts
