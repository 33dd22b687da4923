"""Build the dataset trees the loaders read, from the published files, with one command.

    python -m datamodules.prepare pascal --out DIR --voc-tar VOCtrainval_11-May-2012.tar \\
        --sbd-tgz benchmark.tgz            # or --download
    python -m datamodules.prepare coco --root COCO2014 [--out DIR] [--workers N]

Every output file is written atomically (:func:`datamodules.files.atomic_file`) and the files
an earlier run wrote are kept when they are complete (a PNG whose chunks check out, of its
image's size; a 0-byte or broken one is written again), so an interrupted run resumes where it
stopped. A finished tree carries a ``.prepared-<dataset>.json`` record (no time stamps or
absolute paths: two runs write the same bytes) naming what it holds (COCO: the splits rendered).
Running again checks, by counting and stat'ing files without opening them, that what the record
names is still there: if so it does nothing; otherwise the record is withdrawn and the missing
or empty files are made again (PASCAL from the archives, which must then be given; COCO: the
requested splits not recorded or short of files). A non-empty but corrupt file in a finished
tree is not found by that check: delete the record to have every file checked on the next run.

Inputs (archives, ``--root``, the JSON of each split to render) are checked before any is read.
Errors are one line naming the option, archive, member, file or field and what was expected; a
failed run never leaves a record of files that are not there.
"""

from __future__ import annotations

from .coco import prepare_coco
from .common import PrepareError
from .pascal import prepare_pascal

__all__ = ["PrepareError", "prepare_coco", "prepare_pascal"]
