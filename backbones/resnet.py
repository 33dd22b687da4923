"""One ResNet family (18 to 152, ResNeXt, wide) as a dilated feature-pyramid encoder.

Covers torchvision's ``resnet*`` models with ``replace_stride_with_dilation`` and the encoder shared
by PSPNet (hszhao/semseg), PFENet and ASGNet: deep stem, dilated layer3/layer4, output stride 8.
Stride is traded for dilation in :func:`plan_stages` only, with the rule for the first block of a
dilated stage (the two schemes) in :func:`block_dilations` only.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones.blocks import BasicBlock, Bottleneck, NormLayer, conv3x3
from backbones.features import FeatureInfo, FeaturePyramid
from backbones.protocol import PRE_RELU, Backbone, class_path

STAGES = ("layer1", "layer2", "layer3", "layer4")
FEATURES = ("stem", *STAGES)
OUTPUT_STRIDES = (8, 16, 32)
STEM_STRIDE = 4  # conv (or first deep-stem conv) stride 2, then the 3x3/2 max-pool

DilationScheme = Literal["contracted", "uniform"]
StemType = Literal["standard", "deep"]


@dataclass(frozen=True)
class Arch:
    block: type[BasicBlock] | type[Bottleneck]
    depths: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(BasicBlock, (2, 2, 2, 2)),
    "resnet34": Arch(BasicBlock, (3, 4, 6, 3)),
    "resnet50": Arch(Bottleneck, (3, 4, 6, 3)),
    "resnet101": Arch(Bottleneck, (3, 4, 23, 3)),
    "resnet152": Arch(Bottleneck, (3, 8, 36, 3)),
    "resnext50_32x4d": Arch(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": Arch(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8),
    "wide_resnet50_2": Arch(Bottleneck, (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": Arch(Bottleneck, (3, 4, 23, 3), width_per_group=128),
}

#: The BatchNorm classes (torch's common base is private); lazy variants subclass these.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

NORM_LAYERS: dict[str, NormLayer] = {
    "batchnorm": nn.BatchNorm2d,
    "frozen_batchnorm": FrozenBatchNorm2d,
}


@dataclass(frozen=True)
class StagePlan:
    """How one stage is built: the stride of its first block and each block's two rates."""

    name: str
    stride: int
    output_stride: int
    dilations: tuple[tuple[int, int], ...]  # (first_dilation, dilation) per block


def block_dilations(
    rate: int,
    previous_rate: int,
    num_blocks: int,
    scheme: DilationScheme,
    grid: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Rates ``(first_dilation, dilation)`` of each block of a stage: the one-place rule.

    ``contracted`` (torchvision, timm, mmsegmentation ``contract_dilation``): the first block's
    strided conv keeps the rate in force before the stage. ``uniform`` (PSPNet/PFENet/ASGNet, which
    set dilation = padding on every ``conv2`` of the stage): every block uses the stage's rate. A
    multi-grid (DeepLabv3) gives every block its own rate ``rate * grid[i]``, the first included, as
    mmsegmentation does.
    """
    if grid is not None:
        rates = [rate * g for g in grid]
        return tuple((r, r) for r in rates)
    first = previous_rate if scheme == "contracted" else rate
    return ((first, rate),) + ((rate, rate),) * (num_blocks - 1)


def plan_stages(
    depths: Sequence[int],
    output_stride: int,
    scheme: DilationScheme,
    multi_grid: Mapping[str, Sequence[int]],
) -> list[StagePlan]:
    """Trade stride for dilation once the running stride would exceed ``output_stride``.

    Running-stride bookkeeping as timm's ``output_stride``: 16 dilates layer4 by 2; 8 dilates
    layer3 by 2 and layer4 by 4.
    """
    plans = []
    running_stride, rate = STEM_STRIDE, 1
    for index, (name, num_blocks) in enumerate(zip(STAGES, depths, strict=True)):
        stride = 1 if index == 0 else 2
        previous_rate = rate
        if running_stride * stride > output_stride:
            rate, stride = rate * stride, 1
        else:
            running_stride *= stride
        dilations = block_dilations(rate, previous_rate, num_blocks, scheme, multi_grid.get(name))
        plans.append(StagePlan(name, stride, running_stride, dilations))
    return plans


def resolve_norm_layer(norm_layer: str | NormLayer) -> NormLayer:
    if callable(norm_layer):
        return norm_layer
    if norm_layer not in NORM_LAYERS:
        raise ValueError(
            f"norm_layer={norm_layer!r} is not supported; expected one of {sorted(NORM_LAYERS)} "
            "or a callable taking the channel count"
        )
    return NORM_LAYERS[norm_layer]


def resolve_multi_grid(
    multi_grid: Sequence[int] | Mapping[str, Sequence[int]] | None, depths: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """A bare tuple applies to layer4 (DeepLabv3); a mapping names the stage explicitly."""
    if multi_grid is None:
        return {}
    grids = dict(multi_grid) if isinstance(multi_grid, Mapping) else {"layer4": multi_grid}
    resolved = {}
    for stage, grid in grids.items():
        if stage not in STAGES:
            raise ValueError(
                f"multi_grid names stage {stage!r}, which does not exist; "
                f"expected one of {list(STAGES)}"
            )
        num_blocks = depths[STAGES.index(stage)]
        grid = tuple(int(g) for g in grid)
        if len(grid) != num_blocks or any(g < 1 for g in grid):
            raise ValueError(
                f"multi_grid for {stage} is {grid}: expected {num_blocks} positive multipliers, "
                f"one per block of {stage}"
            )
        resolved[stage] = grid
    return resolved


class _FreezeBatchNormStatistics:
    """Recompute context for activation checkpointing: BatchNorm statistics are not updated twice.

    Checkpointing re-runs a block's forward during backward; in train mode that would apply the
    running-statistics update a second time. Momentum 0 keeps the statistics, and the counter is
    restored, so checkpointed and plain training leave identical buffers.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, _clone(m.num_batches_tracked)) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, counter) in zip(self.norms, self.saved, strict=True):
            m.momentum = momentum
            if counter is not None:
                m.num_batches_tracked.copy_(counter)


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.clone()


def _checkpoint_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _FreezeBatchNormStatistics(block)


class ResNet(Backbone):
    """Dilated ResNet encoder returning a dict of features (``stem``, ``layer1``..``layer4``).

    Args:
        arch: one of :data:`ARCHS` (resnet18 .. wide_resnet101_2).
        output_stride: 8, 16 or 32; strides beyond it become dilation.
        dilation_scheme: ``"contracted"`` (torchvision/timm) or ``"uniform"`` (PSPNet/ASGNet).
        multi_grid: per-block rate multipliers for layer4 (DeepLabv3), or ``{stage: grid}``.
        stem: ``"standard"`` 7x7 conv, or ``"deep"`` three 3x3 convs (64, 64, 128 channels).
        out_layers: which outputs ``forward`` returns, in network order. Stages after the last
            requested one are not run.
        weights: None, a torchvision weight name (``IMAGENET1K_V1``/``V2``/``DEFAULT``) or a
            checkpoint path (torchvision, PSPNet/semseg, PFENet/ASGNet or this project's Lightning
            layout), loaded strictly; see :mod:`backbones.weights`.
        frozen_stages: -1 none; 0 the stem; k the stem and layer1..layerk (no gradients, BatchNorm
            always in eval mode).
        norm_eval: keep every BatchNorm in eval mode across ``.train()`` calls.
        norm_layer: ``"batchnorm"``, ``"frozen_batchnorm"`` or a callable ``channels -> module``.
        zero_init_residual: zero the last BatchNorm of each block (Goyal et al., 2017).
        grad_checkpointing: checkpoint every trainable block's activations in training.
        weights_trusted: read a ``weights`` file with full unpickling (it can run code): only
            for a file from a source you trust that ``torch.load(weights_only=True)`` refuses.

    Outputs (:attr:`output_info`) are ``stem``, every block (``layer3.2``), its residual sum
    before the last ReLU (``layer3.2.pre_relu``) and every stage (``layer3``, the same tensor as
    its last block).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        output_stride: int = 32,
        dilation_scheme: DilationScheme = "contracted",
        multi_grid: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        stem: StemType = "standard",
        out_layers: Sequence[str] = STAGES,
        weights: str | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        norm_layer: str | Callable[[int], nn.Module] = "batchnorm",
        zero_init_residual: bool = False,
        grad_checkpointing: bool = False,
        weights_trusted: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone arch {arch!r}; expected one of {list(ARCHS)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride={output_stride!r} is not supported; expected one of "
                f"{list(OUTPUT_STRIDES)}"
            )
        if dilation_scheme not in ("contracted", "uniform"):
            raise ValueError(
                f"dilation_scheme={dilation_scheme!r}; expected 'contracted' or 'uniform'"
            )
        if stem not in ("standard", "deep"):
            raise ValueError(f"stem={stem!r}; expected 'standard' or 'deep'")
        spec = ARCHS[arch]
        self.arch = arch
        self.stem_type = stem
        self.output_stride = output_stride
        self.grad_checkpointing = grad_checkpointing
        norm = resolve_norm_layer(norm_layer)
        grids = resolve_multi_grid(multi_grid, spec.depths)

        self.stem = self._make_stem(stem, norm)
        inplanes = 128 if stem == "deep" else 64
        outputs = [FeatureInfo("stem", inplanes, STEM_STRIDE, stage=0)]
        self.stage_plans = plan_stages(spec.depths, output_stride, dilation_scheme, grids)
        for index, plan in enumerate(self.stage_plans):
            planes = 64 * 2**index
            stage = self._make_stage(spec, inplanes, planes, plan, norm)
            self.add_module(plan.name, stage)
            inplanes = planes * spec.block.expansion
            tap = partial(
                FeatureInfo, channels=inplanes, stride=plan.output_stride, stage=index + 1
            )
            for i in range(len(stage)):
                outputs.append(tap(f"{plan.name}.{i}{PRE_RELU}", block=i, pre_activation=True))
                outputs.append(tap(f"{plan.name}.{i}", block=i))
            outputs.append(tap(plan.name))
        self.outputs = FeaturePyramid(outputs)
        self.select_outputs(out_layers)

        self._init_weights(zero_init_residual)
        if weights is not None:
            from backbones.weights import load_weights

            load_weights(self, weights, trusted=weights_trusted)
        self.freeze(frozen_stages, norm_eval)

    @staticmethod
    def _make_stem(stem: StemType, norm: NormLayer) -> nn.Sequential:
        if stem == "standard":
            layers = [
                ("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
                ("bn1", norm(64)),
                ("relu", nn.ReLU(inplace=True)),
            ]
        else:
            layers = []
            for i, (cin, cout, stride) in enumerate([(3, 64, 2), (64, 64, 1), (64, 128, 1)], 1):
                layers += [
                    (f"conv{i}", conv3x3(cin, cout, stride)),
                    (f"bn{i}", norm(cout)),
                    (f"relu{i}", nn.ReLU(inplace=True)),
                ]
        layers.append(("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        return nn.Sequential(OrderedDict(layers))

    @staticmethod
    def _make_stage(
        spec: Arch, inplanes: int, planes: int, plan: StagePlan, norm: NormLayer
    ) -> nn.Sequential:
        block = partial(
            spec.block, groups=spec.groups, base_width=spec.width_per_group, norm_layer=norm
        )
        downsample = None
        if plan.stride != 1 or inplanes != planes * spec.block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    inplanes, planes * spec.block.expansion, 1, stride=plan.stride, bias=False
                ),
                norm(planes * spec.block.expansion),
            )
        blocks = []
        for index, (first_dilation, dilation) in enumerate(plan.dilations):
            first = index == 0
            blocks.append(
                block(
                    inplanes if first else planes * spec.block.expansion,
                    planes,
                    stride=plan.stride if first else 1,
                    downsample=downsample if first else None,
                    dilation=dilation,
                    first_dilation=first_dilation,
                )
            )
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's initialisation, so that untrained models behave alike."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (*BATCH_NORMS, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_norm.weight)

    def frozen_modules(self) -> Iterator[nn.Module]:
        """The stem and layer1..layer``frozen_stages``."""
        names = FEATURES[: self.frozen_stages + 1]
        return (getattr(self, name) for name in names)

    def select_outputs(self, out_layers: Sequence[str]) -> None:
        """Choose the outputs ``forward`` returns; stages after the last one are not run."""
        unknown = [name for name in out_layers if name not in self.outputs]
        if unknown or not out_layers:
            raise ValueError(
                f"out_layers={list(out_layers)} is invalid; expected a non-empty subset of "
                f"{list(FEATURES)} or block outputs such as 'layer3.0' or "
                f"'layer3.0{PRE_RELU}'"
            )
        self.out_layers = tuple(name for name in self.outputs if name in out_layers)

    @property
    def last_stage(self) -> int:
        """How many of :data:`STAGES` ``forward`` runs."""
        return FEATURES.index(self.out_layers[-1].split(".")[0])

    def idle_stages(self) -> Iterator[nn.Module]:
        """Stages after the last requested output: built (checkpoints stay whole), never run."""
        return (getattr(self, name) for name in STAGES[self.last_stage :])

    def freeze(self, frozen_stages: int, norm_eval: bool = False) -> None:
        """Stop gradients in the stem and layer1..layer``frozen_stages`` (-1: none)."""
        if not -1 <= frozen_stages <= len(STAGES):
            raise ValueError(f"frozen_stages={frozen_stages}; expected an integer in [-1, 4]")
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """Channels and true stride of each selected output, in ``forward``'s order."""
        return [self.outputs[name] for name in self.out_layers]

    @property
    def output_info(self) -> FeaturePyramid:
        return self.outputs

    def train(self, mode: bool = True) -> ResNet:
        """Frozen stages, and every BatchNorm under ``norm_eval``, stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, BATCH_NORMS):
                        m.eval()
        return self

    def _run_block(self, block: nn.Module, x: Tensor, pre_relu: bool = False) -> Tensor:
        """The block's output (``pre_relu``: its residual sum before the last ReLU)."""
        run = block.pre_activation if pre_relu else block
        trainable = any(p.requires_grad for p in block.parameters())
        if not (
            self.grad_checkpointing and self.training and trainable and torch.is_grad_enabled()
        ):
            return run(x)
        contexts = partial(_checkpoint_contexts, block)
        return checkpoint(run, x, use_reentrant=False, context_fn=contexts)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_from(None, x)

    def _position(self, name: str) -> tuple[int, int]:
        """(stage index, blocks of that stage run) just after output ``name``; the stem is
        (0, 0), ``layer2.1`` and ``layer2.1.pre_relu`` are (2, 2), ``layer2`` (2, all its
        blocks)."""
        if name not in self.outputs:
            raise ValueError(f"unknown output {name!r}; expected one of {list(self.outputs)}")
        if name == "stem":
            return 0, 0
        stage, _, block = name.removesuffix(PRE_RELU).partition(".")
        index = FEATURES.index(stage)
        return index, int(block) + 1 if block else len(getattr(self, stage))

    def forward_from(
        self, name: str | None, x: Tensor, until: str | None = None
    ) -> dict[str, Tensor]:
        if name is not None and name.endswith(PRE_RELU):
            raise ValueError(f"cannot resume the forward from {name!r}, a pre-ReLU output")
        start = (0, -1) if name is None else self._position(name)
        stop = self._position(until or self.out_layers[-1])
        if stop <= start:
            raise ValueError(f"until={until!r} does not come after {name!r}")
        features = {}
        if name is None:
            x = self.stem(x)
            if "stem" in self.out_layers:
                features["stem"] = x
        for index in range(max(start[0], 1), stop[0] + 1):
            stage_name = FEATURES[index]
            stage = getattr(self, stage_name)
            first = start[1] if index == start[0] else 0
            last = stop[1] if index == stop[0] else len(stage)
            if first == last:  # ``name`` is this stage's output
                continue
            inside = any(out.startswith(f"{stage_name}.") for out in self.out_layers)
            if (first, last) == (0, len(stage)) and not (inside or self.grad_checkpointing):
                x = stage(x)  # the stage's own hooks run
            else:
                for index in range(first, last):
                    block, block_name = stage[index], f"{stage_name}.{index}"
                    if block_name + PRE_RELU in self.out_layers:
                        features[block_name + PRE_RELU] = x = self._run_block(block, x, True)
                        x = torch.relu(x)  # not in place: the pre-ReLU output is kept
                    else:
                        x = self._run_block(block, x)
                    if block_name in self.out_layers:
                        features[block_name] = x
            if last == len(stage) and stage_name in self.out_layers:
                features[stage_name] = x
        return features

    def describe(self) -> dict[str, Any]:
        """This encoder's ``class_path`` and ``init_args`` with ``weights`` cleared (a
        checkpoint holds the tensors), for self-describing checkpoints."""
        if not isinstance(self.init_args["norm_layer"], str):
            raise ValueError(
                "norm_layer is a callable, which a checkpoint cannot describe; pass one of "
                f"{sorted(NORM_LAYERS)} by name"
            )
        return {
            "class_path": class_path(self),
            "init_args": {**self.init_args, "weights": None, "weights_trusted": False},
        }

    def summary(self) -> tuple[dict[str, Any], str]:
        """The configuration and a short label telling configurations apart, e.g.
        ``resnet50-deep-os8-uniform`` (PSPNet dilation) or ``resnet50-standard-os8-contracted``."""
        dilations = {
            plan.name: [list(pair) for pair in plan.dilations] for plan in self.stage_plans
        }
        label = f"{self.arch}-{self.stem_type}-os{self.output_stride}"
        dilated = [plan for plan in self.stage_plans if plan.dilations[-1][1] > 1]
        if dilated:
            uniform = all(plan.dilations[0][0] == plan.dilations[0][1] for plan in dilated)
            label += "-uniform" if uniform else "-contracted"
            if len({pair[1] for pair in dilated[-1].dilations}) > 1:
                label += "-multigrid"
        config = {
            "arch": self.arch,
            "stem": self.stem_type,
            "output_stride": self.output_stride,
            "dilations": dilations,
        }
        return config, label


def build_backbone(name: str, **options: object) -> ResNet:
    """Build ``ResNet(arch=name, **options)`` with a clear error for an unknown option."""
    valid = set(inspect.signature(ResNet.__init__).parameters) - {"self", "arch"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"unknown backbone option(s) {unknown} for {name!r}; valid options: {sorted(valid)}"
        )
    return ResNet(arch=name, **options)
