"""List files published by the papers' repositories, shipped with the project (``README.md``
here names each file's source repository, commit and path)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

#: PFENet's/ASGNet's/BAM's PASCAL-5i training list (dvlab-research/PFENet
#: ``lists/pascal/voc_sbd_merge_noduplicate.txt``), relative to this folder.
NODUPLICATE = "pascal/voc_sbd_merge_noduplicate.txt"
#: HSNet's FSS-1000 class splits (juhongm999/hsnet ``data/splits/fss/``).
FSS_SPLITS = "hsnet/fss"
#: HSNet's PASCAL-5i (image, class) lists (juhongm999/hsnet ``data/splits/pascal/``).
HSNET_PASCAL = "hsnet/pascal"


def shipped(relative: str) -> Path:
    """The path of a shipped list file or folder, ``relative`` to ``datamodules/lists/``."""
    return Path(str(importlib.resources.files(__name__) / relative))
