"""Build the dataset trees the loaders read, from the published files, with one command.

    python -m datamodules.prepare pascal --out DIR --voc-tar VOCtrainval_11-May-2012.tar \\
        --sbd-tgz benchmark.tgz            # or --download
    python -m datamodules.prepare coco --root COCO2014 [--out DIR] [--workers N]

Every output file is written atomically (:func:`datamodules.files.atomic_file`) and files that
exist are kept, so an interrupted run resumes where it stopped; a finished tree carries a
``.prepared-<dataset>.json`` record (no time stamps or absolute paths: two runs write the same
bytes), and running again on it does nothing. Errors name the archive, member, file or field and
what was expected.
"""

from __future__ import annotations

from .coco import prepare_coco
from .common import PrepareError
from .pascal import prepare_pascal

__all__ = ["PrepareError", "prepare_coco", "prepare_pascal"]
