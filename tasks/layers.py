"""Small building blocks the heads and the decoders share (no import of either)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear with ``align_corners=True``: how PFENet/ASGNet resize features, masks and
    logits everywhere (the one definition in this project)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def check_dropout(head: nn.Module, **probabilities: float) -> None:
    """Refuse a dropout probability outside ``[0, 1)`` (1 zeroes every feature), naming the
    head's class (a subclass's own) and option."""
    for name, value in probabilities.items():
        if not 0 <= value < 1:
            raise ValueError(
                f"{type(head).__name__} {name}={value!r}: expected a probability in [0, 1)"
            )
