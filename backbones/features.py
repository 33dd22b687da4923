"""An encoder's outputs described by meaning, so that heads never depend on an encoder's names.

Each output says which pyramid stage it belongs to, which block of that stage (or none: the
stage's own output), its stride and channels, and whether it is a pre-activation tap. A head asks
for "the stage outputs of the two stages before the deepest" (PFENet's mid-level features) or
"every block of the last three stages before its last activation" (HSNet), which a ResNet and a
VGG answer with their own names. As timm's ``feature_info``: features described by data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    """One output of an encoder.

    Attributes:
        name: the key of the output in the encoder's ``forward`` dict.
        channels: its channels.
        stride: its true stride relative to the input (dilation keeps it).
        stage: the pyramid stage it belongs to, 0 the shallowest (a ResNet's stem, a VGG's first
            conv stage); ``FeaturePyramid.stage(-1)`` is the deepest.
        block: its block index within the stage, ``None`` for the stage's own output (for a
            ResNet the same tensor as its last block; a VGG stage ends with a pooling layer).
        pre_activation: a block's output before its last activation (HSNet's taps).
    """

    name: str
    channels: int
    stride: int
    stage: int
    block: int | None = None
    pre_activation: bool = False


class FeaturePyramid(Mapping[str, FeatureInfo]):
    """Every output an encoder can give, by name in network order, with selection by meaning.

    Checked at construction: unique names, one output per stage with ``block=None``, stages
    numbered 0, 1, ... in order, pre-activation taps only for blocks.
    """

    def __init__(self, outputs: Iterable[FeatureInfo]) -> None:
        self._outputs: dict[str, FeatureInfo] = {}
        for info in outputs:
            if info.name in self._outputs:
                raise ValueError(f"two encoder outputs are named {info.name!r}")
            if info.pre_activation and info.block is None:
                raise ValueError(f"output {info.name!r} is a pre-activation tap but no block's")
            self._outputs[info.name] = info
        self._stages = tuple(info for info in self._outputs.values() if info.block is None)
        numbers = [info.stage for info in self._stages]
        if numbers != list(range(len(numbers))) or not numbers:
            raise ValueError(
                f"stage outputs must be numbered 0, 1, ... in network order, one per stage; got "
                f"{[(info.name, info.stage) for info in self._stages]}"
            )

    def __getitem__(self, name: str) -> FeatureInfo:
        if name not in self._outputs:
            raise KeyError(f"no encoder output {name!r}; expected one of {list(self._outputs)}")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def __repr__(self) -> str:
        return f"FeaturePyramid({list(self._outputs.values())!r})"

    @property
    def stages(self) -> tuple[FeatureInfo, ...]:
        """Each stage's own output, shallowest first."""
        return self._stages

    def stage(self, index: int) -> FeatureInfo:
        """Stage ``index``'s own output; negative counts from the deepest (``-1``)."""
        count = len(self._stages)
        if not -count <= index < count:
            raise ValueError(
                f"stage {index} does not exist: the encoder has {count} stages "
                f"{[info.name for info in self._stages]}"
            )
        return self._stages[index]

    def blocks(self, index: int, pre_activation: bool = False) -> tuple[FeatureInfo, ...]:
        """The block outputs of stage ``index`` (negative from the deepest) in order, or their
        pre-activation taps."""
        stage = self.stage(index).stage
        return tuple(
            info
            for info in self._outputs.values()
            if info.stage == stage and info.block is not None
            if info.pre_activation == pre_activation
        )

    def channels(self) -> dict[str, int]:
        """Channels by name."""
        return {name: info.channels for name, info in self._outputs.items()}
