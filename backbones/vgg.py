"""VGG-16 as a feature-pyramid encoder, cut into stages as PFENet, BAM and HDMNet cut it.

The papers report VGG-16 rows beside ResNet-50, and PFENet's released COCO models are VGG-16.
Their ``get_vgg16_layer`` (PFENet ``model/PFENet.py``, BAM ``model/BAM.py``) cuts torchvision's
``vgg16_bn().features`` into ``layer0 = features[0:7]``, ``layer1 = [7:14]``, ``layer2 =
[14:24]``, ``layer3 = [24:34]``, ``layer4 = [34:43]``: each of the first four stages ends with
its max-pool, the last one without (the fifth pool is dropped), so the strides are 2, 4, 8, 16,
16 and the channels 64, 128, 256, 512, 512. The modules keep torchvision's classes and order
within each stage, so this encoder's state dict is exactly the official models' ``layer0.*`` ..
``layer4.*`` and torchvision's ``features.{i}`` map onto it by index.

Outputs: each stage (``layer0`` .. ``layer4``), each conv block after its ReLU with VGG's own
names (``conv4_1``: stage 4's first conv in VGG's numbering, i.e. ``layer3``'s first block) and
its pre-activation tap (``conv4_1.pre_relu``, the conv or BatchNorm output).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from backbones.features import FeatureInfo, FeaturePyramid
from backbones.protocol import PRE_RELU, Backbone
from backbones.weights import (
    LoadReport,
    WeightsError,
    _listing,
    load_strict,
    no_backbone_tensors,
    read_weights,
    report_skipped,
)

VGGArch = Literal["vgg16_bn", "vgg16"]

#: VGG-16's conv channels per stage (configuration "D" of Simonyan & Zisserman, 2015).
STAGE_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def stage_modules(arch: VGGArch, ceil_mode: bool = True) -> list[list[nn.Module]]:
    """torchvision's ``vgg16(_bn).features`` modules, grouped into PFENet's five stages (the
    fifth max-pool dropped); ``ceil_mode``: PFENet's and BAM's pooling (``model/vgg.py``)."""
    batch_norm = arch == "vgg16_bn"
    stages, in_channels = [], 3
    for index, widths in enumerate(STAGE_CHANNELS):
        modules: list[nn.Module] = []
        for width in widths:
            modules.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            if batch_norm:
                modules.append(nn.BatchNorm2d(width))
            modules.append(nn.ReLU(inplace=True))
            in_channels = width
        if index < len(STAGE_CHANNELS) - 1:
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
        stages.append(modules)
    return stages


class VGG(Backbone):
    """VGG-16 (with BatchNorm by default, as PFENet, BAM and HDMNet use it) cut at its pooling
    layers into ``layer0`` .. ``layer4``.

    Args:
        arch: ``"vgg16_bn"`` or ``"vgg16"`` (no BatchNorm; HSNet's VGG).
        out_layers: which outputs ``forward`` returns (:attr:`output_info`); stages after the
            last one are not run.
        weights: None, a torchvision weight name (``IMAGENET1K_V1``, ``DEFAULT``) or a
            checkpoint path (torchvision's ``features.*``, a whole PFENet/BAM VGG model's or this
            encoder's ``layer0.*`` .. ``layer4.*``, or this project's Lightning checkpoint),
            loaded strictly.
        weights_trusted: read a ``weights`` file with full unpickling (it can run code).
        pool_ceil_mode: max-pools round up, as PFENet's and BAM's ``model/vgg.py`` (a 473 crop
            gives 60x60 at stride 8, as their ResNets do); ``False`` is torchvision's VGG
            (59x59). The weights are the same.
    """

    def __init__(
        self,
        arch: VGGArch = "vgg16_bn",
        out_layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        weights: str | None = None,
        weights_trusted: bool = False,
        pool_ceil_mode: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ("vgg16_bn", "vgg16"):
            raise ValueError(f"unknown VGG arch {arch!r}; expected 'vgg16_bn' or 'vgg16'")
        self.arch = arch
        outputs: list[FeatureInfo] = []
        #: (stage, modules run) -> the outputs available there
        self.taps: dict[tuple[int, int], list[str]] = {}
        stride = 1
        for index, modules in enumerate(stage_modules(arch, pool_ceil_mode)):
            self.add_module(f"layer{index}", nn.Sequential(*modules))
            block = 0
            for position, module in enumerate(modules, 1):
                if isinstance(module, nn.ReLU):
                    name = f"conv{index + 1}_{block + 1}"
                    channels = STAGE_CHANNELS[index][block]
                    tap = (name + PRE_RELU, position - 1, True), (name, position, False)
                    for tap_name, at, pre in tap:
                        outputs.append(FeatureInfo(tap_name, channels, stride, index, block, pre))
                        self.taps.setdefault((index, at), []).append(tap_name)
                    block += 1
                elif isinstance(module, nn.MaxPool2d):
                    stride *= 2
            outputs.append(FeatureInfo(f"layer{index}", STAGE_CHANNELS[index][-1], stride, index))
            self.taps.setdefault((index, len(modules)), []).append(f"layer{index}")
        self.outputs = FeaturePyramid(outputs)
        self.positions = {name: at for at, names in self.taps.items() for name in names}
        self.select_outputs(out_layers)
        self._init_weights()
        if weights is not None:
            load_vgg_weights(self, weights, trusted=weights_trusted)

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(len(STAGE_CHANNELS))]

    @property
    def output_info(self) -> FeaturePyramid:
        return self.outputs

    def select_outputs(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self.outputs]
        if unknown or not names:
            raise ValueError(
                f"out_layers={list(names)} is invalid; expected a non-empty subset of "
                f"{list(self.outputs)}"
            )
        self.out_layers = tuple(name for name in self.outputs if name in names)

    def idle_stages(self) -> Iterator[nn.Module]:
        last = self.positions[self.out_layers[-1]][0]
        return iter(self.stages[last + 1 :])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_from(None, x)

    def forward_from(
        self, name: str | None, x: Tensor, until: str | None = None
    ) -> dict[str, Tensor]:
        start = (0, 0) if name is None else self.positions[self.outputs[name].name]
        stop = self.positions[self.outputs[until or self.out_layers[-1]].name]
        if stop <= start:
            raise ValueError(f"until={until!r} does not come after {name!r}")
        wanted = set(self.out_layers)
        features: dict[str, Tensor] = {}
        shared = name is not None  # ``x`` is the caller's or an output: no in-place ReLU on it
        for index in range(start[0], stop[0] + 1):
            modules = self.stages[index]
            first = start[1] if index == start[0] else 0
            last = stop[1] if index == stop[0] else len(modules)
            for position in range(first, last):
                module = modules[position]
                x = torch.relu(x) if shared and isinstance(module, nn.ReLU) else module(x)
                taps = [n for n in self.taps.get((index, position + 1), []) if n in wanted]
                features.update(dict.fromkeys(taps, x))
                shared = bool(taps)
        return features

    def summary(self) -> tuple[dict[str, Any], str]:
        return {"arch": self.arch}, self.arch

    def describe(self) -> dict[str, Any]:
        """The architecture with ``weights`` cleared (a checkpoint holds the tensors)."""
        description = super().describe()
        description["init_args"].update(weights=None, weights_trusted=False)
        return description


#: Where each stage starts in torchvision's ``features`` (with and without BatchNorm).
def _stage_offsets(arch: VGGArch) -> list[int]:
    sizes = [len(modules) for modules in stage_modules(arch)]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def vgg_to_native(
    state: dict[str, Tensor], arch: VGGArch, is_lightning: bool
) -> tuple[dict[str, Tensor], list[str], str]:
    """Rename a VGG state dict to :class:`VGG`'s names: (tensors, skipped keys, layout)."""
    if is_lightning:
        native = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        return native, sorted(k for k in state if not k.startswith("backbone.")), "lightning"
    if any(k.startswith("features.") for k in state):
        offsets = _stage_offsets(arch)
        native, skipped = {}, []
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] != "features":
                skipped.append(key)
                continue
            index = int(parts[1])
            stage = max(i for i, offset in enumerate(offsets) if offset <= index)
            native[".".join([f"layer{stage}", str(index - offsets[stage]), *parts[2:]])] = value
        foreign = [k for k in skipped if not k.startswith("classifier.")]
        if foreign:
            raise WeightsError(
                f"unexpected keys in a torchvision VGG checkpoint: {_listing(foreign)}"
            )
        return native, sorted(skipped), "torchvision"
    stage_key = tuple(f"layer{i}." for i in range(len(STAGE_CHANNELS)))
    native = {k: v for k, v in state.items() if k.startswith(stage_key)}
    return native, sorted(k for k in state if k not in native), "pfenet"


def is_vgg_state(state: dict[str, Tensor]) -> bool:
    """Whether official-model encoder tensors (``layer0.*`` ..) are PFENet's VGG-16 cut: its
    ``layer0.0`` is a 3x3 conv of the image, where PSPNet's deep stem has no bias and a ResNet
    has ``layer1.0.conv1``."""
    return "layer0.0.bias" in state and "layer1.0.conv1.weight" not in state


def vgg_arch(state: dict[str, Tensor]) -> VGGArch:
    """``vgg16_bn`` when ``layer0.1`` is a BatchNorm (it has running statistics)."""
    return "vgg16_bn" if "layer0.1.running_mean" in state else "vgg16"


def load_vgg_weights(model: VGG, weights: str | os.PathLike, trusted: bool = False) -> LoadReport:
    """Load a torchvision weight name or a checkpoint file into ``model``, strictly."""
    state, is_lightning, source = read_weights(weights, model.arch, trusted)
    native, skipped, layout = vgg_to_native(state, model.arch, is_lightning)
    if not native:
        raise no_backbone_tensors(source, layout, state)
    hints = []
    if any(".conv1." in key for key in native):
        hints.append("they hold a ResNet's stages (use backbones.ResNet)")
    elif is_vgg_state(native) and vgg_arch(native) != model.arch:
        hints.append(f"they hold a {vgg_arch(native)}")
    return report_skipped(load_strict(model, native, layout, source, hints), skipped)
