"""Strict loading of real ResNet checkpoints in the layouts researchers have.

The reference few-shot repositories load ImageNet weights with ``strict=False`` and so miss keys
silently. Here every backbone tensor must be matched with the right shape; classifier tensors
(``fc.*``) and, in whole-model checkpoints, the non-backbone modules are reported and skipped;
anything else missing, unexpected or misshapen is an error listing the keys.

Layouts, detected from the keys:

- ``native``: this package's own names (``stem.conv1.weight``, ``layer1.0.conv1.weight``...).
- ``torchvision``: ``conv1``/``bn1`` at top level, ``layer1``..``layer4``, ``fc``.
- ``pspnet``: hszhao/semseg ``resnet50_v2.pth`` and friends, used by PSPNet, PFENet and ASGNet:
  deep-stem ``conv1, bn1, conv2, bn2, conv3, bn3`` at top level.
- ``pfenet``: a whole PFENet/ASGNet model, whose stem is ``layer0 = Sequential(conv1, bn1, relu,
  conv2, bn2, relu, conv3, bn3, relu, maxpool)``, so ``layer0.{0,1,3,4,6,7}``.
- ``hsnet``: a whole HSNet or DCAMA model (``best_model.pt`` of juhongm999/hsnet,
  pawn-sxy/DCAMA): a torchvision ResNet under ``backbone.`` (HSNet) or ``feature_extractor.``
  (DCAMA), the rest of the model beside it (:data:`MODEL_ENCODER_PREFIXES`).
- ``lightning``: a checkpoint written by this project's tasks (``state_dict`` with a
  ``backbone.`` prefix).

Containers ``{"state_dict": ...}`` / ``{"model": ...}`` and DataParallel's ``module.`` prefix are
unwrapped first.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import Tensor, nn

if TYPE_CHECKING:
    from backbones.resnet import ResNet

log = logging.getLogger(__name__)

TORCHVISION_WEIGHT_NAMES = ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT")
PFENET_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
STEM_KEY = re.compile(r"^(conv[123]|bn[123])\.")
BACKBONE_KEY = re.compile(r"^(stem|layer[1-4])\.")
COUNTER = "num_batches_tracked"  # BatchNorm's batch counter: not a weight, absent in old files


@dataclass
class LoadReport:
    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded strictly; the message lists the offending keys."""


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


#: The option that lets :func:`read_checkpoint` unpickle a backbone weights file fully.
TRUST_OPTION = "--model.backbone.init_args.weights_trusted true"


def unreadable_reason(error: Exception) -> str:
    """Why ``torch.load`` failed, without torch's advice to retry with ``weights_only=False``:
    for a file that is no pickle at all (random bytes, another format) that advice is wrong and
    unsafe; the unpickler's own reason (``Unsupported operand 76``) is kept."""
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)",
                       str(error), re.S)  # fmt: skip
    if detail:
        return f"not a pickle torch reads: {' '.join(detail[1].split())}"
    return f"{type(error).__name__}: {error}"


def read_checkpoint(
    path: str | os.PathLike, trusted: bool = False, option: str = TRUST_OPTION
) -> dict:
    """``torch.load`` a file with ``weights_only=True`` (tensors and plain containers only),
    with an error naming the file when it is missing or unreadable. A file that needs full
    unpickling, which can run arbitrary code, is refused unless ``trusted``; the error names
    ``option``, the setting that allows it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:
        found = re.findall(r"Unsupported global: GLOBAL [\w.]+", str(error))
        if isinstance(error, pickle.UnpicklingError) and found:
            raise WeightsError(
                f"weights file {str(path)!r} holds Python objects other than tensors and plain "
                f"containers ({found[0]}); unpickling it could run code from the file. If you "
                f"trust its source, pass {option}"
            ) from error
        raise WeightsError(
            f"could not read checkpoint {str(path)!r} ({unreadable_reason(error)}); "
            "expected a file written by torch.save"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, expected a state dict"
        )
    return dict(checkpoint)


def _unwrap(checkpoint: dict) -> tuple[dict[str, Tensor], bool]:
    """The state dict inside a container, and whether it came from a Lightning checkpoint."""
    is_lightning = "pytorch-lightning_version" in checkpoint
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    return state, is_lightning


#: Where whole models keep their encoder: HSNet's ``best_model.pt`` and this project's task
#: checkpoints under ``backbone.``, DCAMA's ``best_model.pt`` under ``feature_extractor.``.
MODEL_ENCODER_PREFIXES = ("backbone.", "feature_extractor.")


def model_encoder_prefix(state: Mapping[str, object]) -> str | None:
    """The :data:`MODEL_ENCODER_PREFIXES` entry a whole model's state dict uses, if any."""
    return next((p for p in MODEL_ENCODER_PREFIXES if any(k.startswith(p) for k in state)), None)


def to_native(state: dict[str, Tensor], is_lightning: bool) -> tuple[dict, list[str], str]:
    """Rename a state dict to this package's names: (tensors, skipped keys, layout name)."""
    if is_lightning:
        layout = "lightning"
        renamed = {k.removeprefix("backbone."): k for k in state if k.startswith("backbone.")}
    elif any(k.startswith("stem.") for k in state):
        layout = "native"
        renamed = {k: k for k in state}
    elif prefix := model_encoder_prefix(state):
        inner = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        native, skipped, _ = to_native(inner, is_lightning=False)
        outside = [k for k in state if not k.startswith(prefix)]
        return native, sorted([f"{prefix}{k}" for k in skipped] + outside), "hsnet"
    elif any(k.startswith("layer0.") for k in state):
        layout = "pfenet"
        renamed = {}
        for key in state:
            parts = key.split(".")
            if parts[0] == "layer0" and parts[1] in PFENET_STEM:
                renamed[".".join(["stem", PFENET_STEM[parts[1]], *parts[2:]])] = key
            elif parts[0] != "layer0":
                renamed[key] = key
    else:
        layout = "pspnet" if "conv2.weight" in state else "torchvision"
        renamed = {("stem." + k if STEM_KEY.match(k) else k): k for k in state}
    native = {new: state[old] for new, old in renamed.items() if BACKBONE_KEY.match(new)}
    used = {renamed[k] for k in native}
    skipped = sorted(k for k in state if k not in used)
    if layout in ("torchvision", "pspnet"):
        foreign = [k for k in skipped if not k.startswith("fc.")]
        if foreign:
            raise WeightsError(
                f"unexpected keys in a {layout}-layout checkpoint: {_listing(foreign)}"
            )
    return native, skipped, layout


def checkpoint_arch(state: Mapping[str, Tensor]) -> tuple[list[int], list[str]]:
    """Blocks per stage of native-named tensors, and the architectures they fit (by depths,
    block type and the first bottleneck's width and groups), to name a checkpoint's network."""
    from backbones.resnet import ARCHS, STAGES

    depths = [
        len({k.split(".")[1] for k in state if k.startswith(f"{stage}.")}) for stage in STAGES
    ]
    bottleneck = "layer1.0.conv3.weight" in state
    conv2 = state.get("layer1.0.conv2.weight")
    archs = []
    for name, arch in ARCHS.items():
        if list(arch.depths) != depths or (arch.block.expansion > 1) != bottleneck:
            continue
        width = arch.width_per_group * arch.groups  # conv2 of layer1's first bottleneck
        if (
            bottleneck
            and conv2 is not None
            and tuple(conv2.shape[:2]) != (width, arch.width_per_group)
        ):
            continue
        archs.append(name)
    return depths, archs


def state_mismatches(
    expected: Mapping[str, Tensor],
    state: Mapping[str, object],
    compare_keys: bool = True,
    limit: int = 12,
) -> list[str]:
    """``missing: ...``, ``unexpected: ...`` and ``shape mismatch: ...`` between ``state`` and
    the ``expected`` state dict, empty when it fits; ``compare_keys=False`` compares the shapes
    of shared keys only (non-strict loading)."""
    missing = sorted(set(expected) - set(state)) if compare_keys else []
    unexpected = sorted(set(state) - set(expected)) if compare_keys else []
    misshapen = sorted(
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in set(expected) & set(state)
        if isinstance(state[key], Tensor) and state[key].shape != expected[key].shape
    )
    return [
        f"{label}: {_listing(keys, limit)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", misshapen),
        )
        if keys
    ]


def load_strict(
    model: nn.Module, state: dict[str, Tensor], layout: str, source: str, hints: list[str] = ()
) -> LoadReport:
    """Load tensors named as ``model`` names them, strictly; every mismatch is listed in one
    error (after ``hints``, such as the network the tensors do fit)."""
    expected = model.state_dict()
    given = {k for k in state if not k.endswith(COUNTER)}
    problems = state_mismatches(
        {k: v for k, v in expected.items() if not k.endswith(COUNTER)},
        {k: state[k] for k in given},
    )
    if problems:
        _, label = model.summary()
        raise WeightsError(
            f"weights {source!r} ({layout} layout) do not fit backbone {label}: "
            + "; ".join([*hints, *problems])
        )
    full = {k: state.get(k, v) for k, v in expected.items()}
    model.load_state_dict(full, strict=True)
    return LoadReport(source, layout, loaded=sorted(given))


def torchvision_checkpoint_path(arch: str, name: str) -> tuple[str, Path]:
    """The URL of a torchvision weight and the file torchvision's download cache keeps it in."""
    enum = torchvision.models.get_model_weights(arch)
    try:
        weight = enum[name]
    except KeyError:
        raise WeightsError(
            f"torchvision has no weight {name!r} for {arch}; expected one of "
            f"{[w.name for w in enum]} or DEFAULT"
        ) from None
    url = weight.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_torchvision_state(arch: str, name: str) -> dict[str, Tensor]:
    """Fetch through torchvision's own cache (``$TORCH_HOME/hub/checkpoints``)."""
    url, cached = torchvision_checkpoint_path(arch, name)
    if cached.is_file():
        return read_checkpoint(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except (urllib.error.URLError, OSError) as error:
        raise WeightsError(
            f"could not download {arch} {name} from {url} ({error}). Offline, download that file "
            f"elsewhere and place it at {cached} (torchvision's cache; set TORCH_HOME to move it), "
            "or pass its path as weights"
        ) from error


def is_weight_name(weights: str) -> bool:
    return weights in TORCHVISION_WEIGHT_NAMES


def read_weights(
    weights: str | os.PathLike, arch: str, trusted: bool = False
) -> tuple[dict[str, Tensor], bool, str]:
    """The tensors of a torchvision weight name for ``arch`` or of a checkpoint file: (state
    dict, whether Lightning wrote it, the source to name in messages)."""
    if isinstance(weights, str) and is_weight_name(weights):
        state, is_lightning = _unwrap(fetch_torchvision_state(arch, weights))
        return state, is_lightning, f"torchvision:{arch}.{weights}"
    path = Path(weights)
    if not path.is_file() and not str(weights).endswith((".pth", ".pt", ".ckpt", ".bin")):
        raise WeightsError(
            f"weights={str(weights)!r} is neither an existing checkpoint file nor a "
            f"torchvision weight name (expected one of {list(TORCHVISION_WEIGHT_NAMES)})"
        )
    state, is_lightning = _unwrap(read_checkpoint(path, trusted))
    return state, is_lightning, str(path)


def report_skipped(report: LoadReport, skipped: list[str]) -> LoadReport:
    """Record and log the tensors of the file that were not the encoder's."""
    report.skipped = skipped
    log.info(
        "loaded %d tensors from %s (%s layout); skipped %d: %s",
        len(report.loaded),
        report.source,
        report.layout,
        len(skipped),
        _listing(skipped),
    )
    return report


def no_backbone_tensors(source: str, layout: str, state: Mapping[str, Tensor]) -> WeightsError:
    return WeightsError(
        f"checkpoint {source!r} ({layout} layout) holds no backbone tensors; "
        f"its keys start with {_listing(sorted({k.split('.')[0] for k in state}))}"
    )


def load_weights(model: ResNet, weights: str | os.PathLike, trusted: bool = False) -> LoadReport:
    """Load a torchvision weight name or a checkpoint file into ``model``, strictly
    (``trusted``: see :func:`read_checkpoint`)."""
    if isinstance(weights, str) and is_weight_name(weights) and model.stem_type != "standard":
        raise WeightsError(
            f"torchvision weights {weights!r} are for the standard 7x7 stem, but the backbone "
            "has stem='deep'; use a PSPNet-layout checkpoint (e.g. resnet50_v2.pth) as weights"
        )
    state, is_lightning, source = read_weights(weights, model.arch, trusted)
    native, skipped, layout = to_native(state, is_lightning)
    if not native:
        raise no_backbone_tensors(source, layout, state)
    depths, archs = checkpoint_arch(native)
    hints = []
    if archs and model.arch not in archs:
        hints.append(f"they hold a {' or '.join(archs)} (blocks per stage {depths})")
    return report_skipped(load_strict(model, native, layout, source, hints), skipped)
