"""Residual blocks with dilation support.

The blocks follow torchvision's ``models/resnet.py`` (ResNet v1.5: the stride sits on the 3x3 conv
of the Bottleneck) with two changes: BasicBlock accepts dilation (torchvision raises), and a block
takes two rates, as timm's ResNet does: ``first_dilation`` for the 3x3 conv that carries the
stride and ``dilation`` for the block's other 3x3 conv. Which rates a block gets is decided by the
stage builder in :mod:`backbones.resnet`, in one place.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


def conv3x3(
    in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    """3x3 convolution whose padding equals its dilation, so that stride 1 keeps the size."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        dilation=dilation,
        bias=False,
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``first_dilation`` applies to the strided conv1."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock supports groups=1 and base_width=64 only, got groups={groups}, "
                f"base_width={base_width}"
            )
        self.conv1 = conv3x3(inplanes, planes, stride, dilation=first_dilation or dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.pre_activation(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """The residual sum before the block's last ReLU (what HSNet correlates)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 with the stride on the 3x3 conv (ResNet v1.5, as torchvision and PSPNet).

    The block has a single 3x3 conv, which carries both the stride and ``first_dilation``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, first_dilation or dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.pre_activation(x))

    def pre_activation(self, x: Tensor) -> Tensor:
        """The residual sum before the block's last ReLU (what HSNet correlates)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3
