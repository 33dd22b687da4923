"""Any timm model behind the :class:`~backbones.Backbone` contract.

:class:`TimmEncoder` builds a timm model by name and runs it as a sequence of steps, each
ending at an output it declares (:class:`~backbones.features.FeatureInfo`), so ``forward``
computes only what is selected and stops after the last, and ``forward_from`` resumes at any
output (PFENet's mask-multiplied support features). Two families:

* **Hierarchical** models (ResNet, ConvNeXt, Swin, and any model whose timm ``feature_info``
  names stage modules run one after another): the stages are timm's ``feature_info``
  (timm's ResNet: ``act1`` at stride 2, then ``layer1..4``), each stage's blocks are outputs
  (``layer3.2``, ``stages.2.4``), and ResNet bottlenecks also give their output before the last
  ReLU (``layer3.2.pre_relu``: HSNet's and DCAMA's taps; timm's block output is after it).
  Swin's channels-last maps are returned channels-first.
* **Plain ViTs** (DINOv2, DINOv3 as timm's Eva with rotary embeddings, CLIP, SAM's ViT): one
  patch-size scale; ``stage_ends`` groups the
  blocks into stages (VRP-SAM's DINOv2-L: ``[8, 12, 21, 24]``), every block is an output, prefix
  tokens (class, registers) are dropped from the maps, and ``final_norm`` applies the model's
  last norm to every output as DINOv2's ``get_intermediate_layers(norm=True)`` does (timm's
  ``forward_intermediates`` does not). ``forward_from(name, x)`` runs the later blocks on the
  map ``x`` as patch tokens, with the prefix tokens the same images had at ``name`` in the
  forward that stopped there (``forward_from(None, images, until=name)``: what the task does for
  PFENet's mask-multiplied support; one resume per such forward, and any other forward forgets
  them); a map after the final norm cannot be resumed
  (``final_norm``: heads with ``support_mask_at`` refuse it).

timm's output-stride-8 ResNet dilates each stage's first block at the previous rate
(torchvision's ``contracted`` scheme), not PSPNet's uniform rule: the papers' parity encoder
stays :class:`backbones.ResNet`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import is_model, model_entrypoint
from timm.models.eva import Eva
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import Tensor, nn

from .features import FeatureInfo, FeaturePyramid
from .protocol import PRE_RELU, Backbone
from .weights import WeightsError, model_encoder_prefix, read_checkpoint

#: timm's modules of plain ViTs (one patch-size scale, blocks grouped into stages), by which a
#: model name's family is told (``vit_small_patch16_dinov3`` is an Eva, ``deit_*`` a ViT)
PLAIN_VITS = ("vision_transformer", "deit", "eva", "vision_transformer_sam")

#: output name -> (stage, block index or ``None`` for the stage's own output)
Places = dict[str, tuple[int, int | None]]


@dataclass(frozen=True)
class Step:
    """One module run in order, the outputs it ends with (a block's, and its stage's when it is
    the last block) and the pre-activation tap recorded inside it."""

    module: nn.Module
    outputs: tuple[str, ...] = ()
    pre_activation: str | None = None
    tap: PreActivationTap | None = None


def stage_modules(model: nn.Module) -> list[str]:
    """The module names of timm's ``feature_info`` (``layer1``, ``stages.2``)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"timm model {type(model).__name__} declares no feature_info")
    return [entry["module"] for entry in info]


def blocks_of(stage: nn.Module) -> tuple[list[nn.Module], nn.Sequential | None]:
    """A stage's modules before its blocks (a downsample) and its blocks: ``stage.blocks``
    (ConvNeXt, Swin) or the stage itself when it is a sequence of blocks (ResNet)."""
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return [m for n, m in stage.named_children() if n != "blocks"], blocks
    if isinstance(stage, nn.Sequential):
        return [], stage
    return [], None


#: The last activation of timm's ResNet blocks, after the residual sum (HSNet's taps are before
#: it): ``Bottleneck.act3``, ``BasicBlock.act2``.
LAST_ACTIVATION = {"Bottleneck": "act3", "BasicBlock": "act2"}


class PreActivationTap(nn.Module):
    """A ResNet bottleneck's last activation, keeping its input (the residual sum) for the
    forward that asked for it."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        if getattr(activation, "inplace", False):
            activation.inplace = False  # an in-place ReLU would overwrite the recorded sum
        self.activation = activation
        self.recorded: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.recorded = x
        return self.activation(x)


class ViTEmbedding(nn.Module):
    """What runs before a ViT's first block, as its ``forward_features`` does: the patch
    embedding (of the image padded to whole patches), the position embedding interpolated to
    the input's grid (with the prefix tokens: ``_pos_embed``; SAM's is added to its
    channels-last map), patch dropout and the pre-norm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = [model]  # not a submodule: the encoder owns it
        self.rope: Tensor | None = None

    def forward(self, image: Tensor) -> Tensor:
        model = self.model[0]
        if isinstance(model, VisionTransformerSAM):  # padded to whole patches, as timm pads
            height, width = model.patch_embed.patch_size  # the other ViTs (dynamic_img_pad)
            image = F.pad(image, (0, -image.shape[-1] % width, 0, -image.shape[-2] % height))
        x = model.patch_embed(image)
        if isinstance(model, Eva):  # DINOv3: rotary embeddings, passed to every block
            x, self.rope = model._pos_embed(x)
            return model.norm_pre(x)
        if isinstance(model, VisionTransformerSAM):
            if model.pos_embed is not None:
                x = x + resample_abs_pos_embed_nhwc(model.pos_embed, x.shape[1:3])
            x = model.pos_drop(x)
        else:
            x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)


class RotaryBlock(nn.Module):
    """An Eva block (DINOv3) run with the rotary embeddings the embedding step computed for this
    input (one for all blocks, or each block's own under ``rope_mixed``)."""

    def __init__(self, block: nn.Module, index: int, embedding: ViTEmbedding) -> None:
        super().__init__()
        self.block, self.index, self.embedding = block, index, [embedding]

    def forward(self, x: Tensor) -> Tensor:
        rope = self.embedding[0].rope
        if getattr(self.embedding[0].model[0], "rope_mixed", False) and rope is not None:
            rope = rope[self.index]
        return self.block(x, rope=rope)


class TimmEncoder(Backbone):
    """A timm model as a feature pyramid (see the module docstring).

    Args:
        model_name: timm's name (``resnet50.a1h_in1k``, ``convnext_tiny``,
            ``swin_base_patch4_window12_384.ms_in22k_ft_in1k``, ``vit_small_patch14_dinov2``).
        pretrained: timm's weights of that name (downloaded through the Hugging Face cache).
        weights: a local state dict in timm's layout, loaded strictly, tensors only.
        weights_trusted: unpickle ``weights`` fully (only a file you trust).
        output_stride: timm's dilation (8, 16; ``None``: the model's own).
        blocks: declare every block's output (and ResNet's pre-activation taps).
        stage_ends: ViTs: the exclusive end of each stage's blocks (``None``: 4 equal groups).
        final_norm: ViTs: apply the final norm to every output.
        img_size: the input size a ViT's position embeddings or a Swin's windows are built for
            (``None``: the model's; a ViT takes other sizes, interpolating them).
        timm_options: further keyword arguments of ``timm.create_model`` (``drop_path_rate``;
            ``depth`` of a smaller model).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        weights: str | None = None,
        weights_trusted: bool = False,
        output_stride: int | None = None,
        blocks: bool = True,
        stage_ends: list[int] | None = None,
        final_norm: bool = False,
        img_size: int | None = None,
        timm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        options: dict[str, Any] = {**(timm_options or {}), "pretrained": pretrained,
                                   "num_classes": 0}  # fmt: skip
        if output_stride is not None:
            options["output_stride"] = output_stride
        if img_size is not None:
            options["img_size"] = img_size
        architecture = model_name.split(".")[0]
        if not is_model(architecture):
            raise ValueError(
                f"unknown timm model {model_name!r}; expected a name of timm.list_models() "
                f"(e.g. {timm.list_models(f'*{architecture[:4]}*')[:5]})"
            )
        family = model_entrypoint(architecture).__module__.rsplit(".", 1)[-1]
        self.is_vit = family in PLAIN_VITS
        if self.is_vit and family != "vision_transformer_sam":
            options |= {"dynamic_img_size": True, "dynamic_img_pad": True}  # any input size
        if family == "swin_transformer":
            options["strict_img_size"] = False  # windows padded: any input size
        self.model = timm.create_model(model_name, **options)
        if weights is not None:
            load_timm_weights(self.model, weights, weights_trusted)
        if final_norm and not isinstance(getattr(self.model, "norm", None), nn.LayerNorm):
            raise ValueError(f"final_norm: {model_name} has no final norm (SAM's is its neck)")
        self.model_name, self.final_norm = model_name, final_norm
        self.channels_last_maps = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self._grid: tuple[int, int] = (0, 0)
        #: a ViT's prefix tokens at the output its last partial forward stopped at
        self._prefix: tuple[str, Tensor] | None = None
        if self.is_vit:
            self.steps, stages = self._vit_steps(stage_ends)
        else:
            self.steps, stages = self._hierarchical_steps(blocks)
        self.outputs = self._probe(stages)
        self.selected = list(self.outputs)

    # --- building -------------------------------------------------------------------------

    def _hierarchical_steps(self, blocks: bool) -> tuple[list[Step], Places]:
        """Steps through the model's children up to its last ``feature_info`` stage, each stage
        split into its blocks; ``{output: (stage, block)}``."""
        names = stage_modules(self.model)
        steps: list[Step] = []
        where: Places = {}
        for child, module in self.model.named_children():
            if len(where) and all(n in where for n in names):
                break
            nested = any(n.startswith(f"{child}.") for n in names)
            parts = [(f"{child}.{n}", m) for n, m in module.named_children()] if nested else []
            for name, part in parts or [(child, module)]:
                if name not in names:
                    steps.append(Step(part))
                    continue
                stage = names.index(name)
                steps += self._stage_steps(name, part, stage, blocks, where)
        return steps, where

    @staticmethod
    def _stage_steps(
        name: str,
        module: nn.Module,
        stage: int,
        blocks: bool,
        where: Places,
    ) -> list[Step]:
        before, block_list = blocks_of(module)
        if not blocks or block_list is None:
            where[name] = (stage, None)
            return [Step(module, (name,))]
        steps = [Step(part) for part in before]
        for index, block in enumerate(block_list):
            attribute = LAST_ACTIVATION.get(type(block).__name__)
            pre = None
            if attribute is not None:
                activation = getattr(block, attribute)
                if not isinstance(activation, PreActivationTap):
                    setattr(block, attribute, PreActivationTap(activation))
                pre = f"{name}.{index}{PRE_RELU}"
                where[pre] = (stage, index)
            outputs = (f"{name}.{index}",)
            where[outputs[0]] = (stage, index)
            if index == len(block_list) - 1:
                outputs += (name,)
                where[name] = (stage, None)
            steps.append(Step(block, outputs, pre, getattr(block, attribute) if pre else None))
        return steps

    def _vit_steps(self, stage_ends: list[int] | None) -> tuple[list[Step], Places]:
        depth = len(self.model.blocks)
        ends = list(stage_ends) if stage_ends else [depth * (k + 1) // 4 for k in range(4)]
        if sorted(set(ends)) != ends or ends[0] < 1 or ends[-1] > depth:
            raise ValueError(
                f"stage_ends={ends} must increase within 1..{depth} ({self.model_name} has "
                f"{depth} blocks)"
            )
        embedding = ViTEmbedding(self.model)
        steps = [Step(embedding)]
        where: Places = {}
        start = 0
        for stage, end in enumerate(ends):
            for index in range(start, end):
                outputs = (f"blocks.{index}",)
                where[outputs[0]] = (stage, index - start)
                if index == end - 1:
                    outputs += (f"stage{stage}",)
                    where[f"stage{stage}"] = (stage, None)
                block = self.model.blocks[index]
                if isinstance(self.model, Eva):
                    block = RotaryBlock(block, index, embedding)
                steps.append(Step(block, outputs))
            start = end
        return steps, where

    def _probe(self, where: Places) -> FeaturePyramid:
        """Every output's channels and stride, from one forward at the model's input size."""
        size = self._input_size()
        was_training = self.model.training
        with torch.no_grad():
            self.model.eval()
            found = self._run(torch.zeros(1, 3, size, size), None, None, set(where))
        self.model.train(was_training)
        infos = []
        for name, value in found.items():
            stage, block = where[name]
            stride = size // value.shape[-1]
            infos.append(FeatureInfo(name, value.shape[1], stride, stage, block,
                                     name.endswith(PRE_RELU)))  # fmt: skip
        return FeaturePyramid(infos)

    def _input_size(self) -> int:
        """A probe size every output's stride divides: 224 (windowed models such as MaxViT
        need it), or 8 patches of a ViT (SAM's own 1024 px would make building slow)."""
        if self.is_vit:
            return 8 * self.model.patch_embed.patch_size[0]
        return 224

    # --- running --------------------------------------------------------------------------

    def _to_map(self, x: Tensor) -> Tensor:
        """A step's output as ``[B, C, H, W]`` (a ViT's patch tokens, a Swin's NHWC map)."""
        if self.is_vit and x.dim() == 3:  # tokens
            if self.final_norm:
                x = self.model.norm(x)
            patches = x[:, getattr(self.model, "num_prefix_tokens", 0) :]
            return patches.transpose(1, 2).reshape(x.shape[0], -1, *self._grid)
        if self.channels_last_maps or isinstance(self.model, VisionTransformerSAM):
            return x.permute(0, 3, 1, 2)
        return x

    def _run(
        self,
        x: Tensor,
        start: str | None,
        until: str | None,
        wanted: set[str],
        record: bool = False,
    ) -> dict[str, Tensor]:
        """The ``wanted`` outputs of the steps after output ``start`` (``None``: from the
        image), stopping at ``until`` (``None``: the last wanted); ``record``: keep a ViT's
        prefix tokens at ``until`` for one resume (:meth:`_resumed`)."""
        first = 0
        if start is not None:
            first = next(i for i, s in enumerate(self.steps) if start in s.outputs) + 1
            x = self._resumed(start, x)
        else:
            self._prefix = None  # another image: an earlier record is stale
            if self.is_vit:
                self._grid = self._grid_of(x)
        last = until or next(
            n for s in reversed(self.steps) for n in (*s.outputs, s.pre_activation) if n in wanted
        )
        found: dict[str, Tensor] = {}
        for step in self.steps[first:]:
            x = step.module(x)
            if step.tap is not None:
                if step.pre_activation in wanted:
                    found[step.pre_activation] = self._to_map(step.tap.recorded)
                step.tap.recorded = None
            for name in step.outputs:
                if name in wanted:
                    found[name] = self._to_map(x)
            if last in step.outputs or last == step.pre_activation:
                if record and self.is_vit and x.dim() == 3:
                    self._prefix = until, x[:, : self.model.num_prefix_tokens].clone()
                break
        return found

    def _resumed(self, start: str, x: Tensor) -> Tensor:
        """A map ``[B, C, H, W]`` standing for output ``start``, as the next step's input: a
        Swin's channels-last map, a ViT's tokens (SAM's channels-last map; the others' patch
        tokens after the prefix tokens the same images had at ``start``)."""
        if self.channels_last_maps or isinstance(self.model, VisionTransformerSAM):
            return x.permute(0, 2, 3, 1)
        if not self.is_vit:
            return x
        if not self.resumable:
            raise ValueError(f"{self.model_name}: final_norm maps cannot be resumed (the blocks "
                             "run on tokens before the norm); set final_norm false")  # fmt: skip
        recorded, self._prefix = self._prefix, None  # one resume per record
        if recorded is None or recorded[0] != start or recorded[1].shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.model_name}: forward_from({start!r}, x) resumes the images of the last "
                f"forward_from(None, images, until={start!r}) (a ViT's class and register tokens "
                f"are not in the map); that forward stopped at "
                f"{recorded and (recorded[0], recorded[1].shape[0])} (output, batch)"
            )
        if tuple(x.shape[-2:]) != self._grid:
            raise ValueError(
                f"{self.model_name}: forward_from({start!r}) got a {tuple(x.shape[-2:])} map; "
                f"those images' grid is {self._grid}"
            )
        return torch.cat([recorded[1].to(x.dtype), x.flatten(2).transpose(1, 2)], 1)

    def _grid_of(self, image: Tensor) -> tuple[int, int]:
        """The token grid of an image (padded up to whole patches)."""
        patch = self.model.patch_embed.patch_size
        return -(-image.shape[-2] // patch[0]), -(-image.shape[-1] // patch[1])

    # --- the Backbone contract --------------------------------------------------------------

    @property
    def output_info(self) -> FeaturePyramid:
        return self.outputs

    def select_outputs(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self.outputs]
        if unknown or not names:
            raise ValueError(f"{self.model_name}: no outputs {unknown}; expected some of "
                             f"{list(self.outputs)}")  # fmt: skip
        chosen = set(names)
        self.selected = [name for name in self.outputs if name in chosen]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        found = self._run(x, None, None, set(self.selected))
        return {name: found[name] for name in self.selected}

    def forward_from(
        self, name: str | None, x: Tensor, until: str | None = None
    ) -> dict[str, Tensor]:
        names = list(self.outputs)
        start = -1 if name is None else names.index(name)
        end = len(names) - 1 if until is None else names.index(until)
        wanted = {n for n in self.selected if start < names.index(n) <= end}
        record = name is None and until is not None
        found = self._run(x, name, until or self.selected[-1], wanted, record)
        return {n: found[n] for n in self.selected if n in found}

    @property
    def resumable(self) -> bool:
        return not (self.is_vit and self.final_norm)

    def idle_stages(self) -> Iterator[nn.Module]:
        last = self.selected[-1]
        index = next(i for i, s in enumerate(self.steps) if last in s.outputs
                     or last == s.pre_activation)  # fmt: skip
        return (step.module for step in self.steps[index + 1 :])

    def describe(self) -> dict[str, Any]:
        """The architecture: no download and no file when rebuilt (a checkpoint holds the
        tensors)."""
        described = super().describe()
        described["init_args"] |= {"pretrained": False, "weights": None, "weights_trusted": False}
        return described

    def summary(self) -> tuple[dict[str, Any], str]:
        stride = min(info.stride for info in self.outputs.stages[1:] or self.outputs.stages)
        deepest = self.outputs.stages[-1].stride
        return (
            {"timm": self.model_name, "output_stride": deepest, "first_stride": stride},
            f"{self.model_name}-os{deepest}",
        )


#: Where a :class:`TimmEncoder`'s state dict keeps the timm model.
ENCODER_MODEL = "model."


def load_timm_weights(model: nn.Module, path: str, trusted: bool) -> None:
    """A local state dict into ``model`` strictly (``state_dict``/``model`` containers and
    ``module.`` prefixes unwrapped; a whole model's encoder taken from under its prefix
    (:data:`~backbones.weights.MODEL_ENCODER_PREFIXES`: HSNet's and DCAMA's released models,
    this project's checkpoints), a TimmEncoder's from under :data:`ENCODER_MODEL`; a release's own
    layout converted by timm's checkpoint filter
    of the model's family: DINOv2's ``dinov2_vits14_pretrain.pth``, OpenAI CLIP's, SAM's; the
    classifier, which the encoder drops, ignored), with an error listing the keys that do not
    fit."""
    checkpoint = read_checkpoint(
        path, trusted, option="--model.backbone.init_args.weights_trusted true"
    )
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if prefix := model_encoder_prefix(state):  # a whole model: the rest skipped
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if state and all(key.startswith(ENCODER_MODEL) for key in state):  # a TimmEncoder's own
        state = {k.removeprefix(ENCODER_MODEL): v for k, v in state.items()}
    convert = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:  # the releases' own layouts (DINOv2, OpenAI CLIP, SAM) to timm's
        state = convert(state, model)
    expected = model.state_dict()
    head = ("fc.", "head.", "classifier.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(head))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise WeightsError(
            f"weights {path!r} do not fit timm model {type(model).__name__}: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}, other shapes {shapes[:8]}"
        )
    model.load_state_dict({k: state[k] for k in expected})
