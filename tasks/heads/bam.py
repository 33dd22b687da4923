"""BAM head: Lang et al., "Learning What Not to Segment: A New Perspective on Few-Shot
Segmentation", CVPR 2022; official code github.com/chunbolang/BAM (``model/BAM.py``,
``model/ASPP.py``, ``model/PSPNet.py``, ``config/pascal/pascal_split0_resnet50.yaml``).

A meta learner (PFENet's prior and mid-level prototype, an ASPP decoder) and a frozen **base
learner** (a PSPNet trained on the fold's base classes, :mod:`tasks.semantic`) run on the same
frozen encoder; the base learner's foreground (every base class but the episode's own) says what
not to segment, and a Gram-matrix estimate of how far the support's scene is from the query's
weighs the two.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.arguments import plain
from backbones.features import FeaturePyramid
from backbones.protocol import Backbone, build_described, class_path
from backbones.weights import WeightsError, read_checkpoint
from tasks.callbacks.data_settings import stored_settings
from tasks.decoders import DECODER_PREFIXES, PSPDecoder
from tasks.layers import check_dropout, resize

from .common import (
    HeadOutput,
    check_inputs,
    foreground_masks,
    masked_average_pooling,
    mid_level_channels,
    mid_level_features,
    mid_level_layers,
)
from .fem import FeatureEnrichment
from .official import OfficialCheckpoint
from .pfenet import mid_level_reduction, shot_priors

#: Rates of the ASPP branches after the global one (``model/ASPP.py``: 1x1, then 6, 12, 18).
ASPP_RATES = (6, 12, 18)


class ASPP(nn.Module):
    """BAM's ASPP (``model/ASPP.py``): an image-pooling branch (``layer6_0``), a 1x1 branch and
    three 3x3 branches at rates 6/12/18, each a conv with bias and ReLU, concatenated in that
    order (5C channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
        for index, rate in enumerate(ASPP_RATES, 2):
            conv = nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate)
            self.add_module(f"layer6_{index}", nn.Sequential(conv, nn.ReLU()))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.layer6_0(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        branches = [self.layer6_1, self.layer6_2, self.layer6_3, self.layer6_4]
        return torch.cat([pooled, *(branch(x) for branch in branches)], 1)


def gram_matrix(features: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, C, C] cosine Gram matrix (``get_gram_matrix``: ``F F^T / (|F| |F|^T
    + 1e-7)``), in fp32."""
    flat = features.float().flatten(2)
    norms = flat.norm(dim=2, keepdim=True)
    return torch.bmm(flat, flat.transpose(1, 2)) / (torch.bmm(norms, norms.transpose(1, 2)) + 1e-7)


def scene_distance(query: Tensor, support: Tensor) -> Tensor:
    """BAM's adjustment factor per shot: ``|G_q - G_s|_F / |1|_F`` of the low-level features'
    Gram matrices; query [B, C, h, w], support [B, K, C, h, w] -> [B, K]."""
    batch, shots = support.shape[:2]
    query_gram = gram_matrix(query)
    support_gram = gram_matrix(support.flatten(0, 1)).unflatten(0, (batch, shots))
    channels = query_gram.shape[-1]
    return (query_gram[:, None] - support_gram).flatten(2).norm(dim=2) / channels


class BAMHead(OfficialCheckpoint):
    """BAM's meta learner, base learner and ensemble (ResNet or VGG-16 encoder).

    From the official ``model/BAM.py`` (names and shapes kept, so its checkpoints load):

    * Meta learner: PFENet's mid-level features (:func:`~tasks.heads.common.mid_level_layers`)
      reduced by ``down_query``/``down_supp`` (1x1, ReLU, Dropout2d 0.5), the support prototype
      by masked average pooling, PFENet's training-free prior from the deepest stage (the
      support's computed on its masked second-deepest stage: ``support_mask_at``),
      ``init_merge`` (2C + 1 -> C), :class:`ASPP` (``ASPP_meta``), ``res1_meta`` (5C -> C),
      ``res2_meta`` with residual, ``cls_meta`` (2 classes).
    * Base learner (``learner_base = Sequential(ppm, cls)``): the PSPNet decoder
      (:class:`tasks.decoders.PSPDecoder`) of a :mod:`tasks.semantic` model trained on the
      fold's base classes, run frozen on the query's deepest stage.
    * Adjustment factor: :func:`scene_distance` of the low-level features (``low_fea:
      layer2``, the shallower mid-level stage; on VGG-16 resized to layer3's size first, as
      ``model/BAM.py`` does).
    * K shots: the shots' distances sorted, ``kshot_rw`` (1x1 convs K -> ``kshot_trans_dim`` ->
      K, or one K -> K conv initialised to 1/K when 0), restored to shot order, softmax: the
      weights of the shots' priors and prototypes (1 shot: weight 1).
    * Ensemble: ``gram_merge`` (a 2 -> 1 conv initialised to (1, 0)) merges each meta
      probability map with the distance; ``cls_merge`` (likewise) merges the meta background
      with the base learner's foreground, the sum of its base-class probabilities but the
      episode's own class; the output is (merged background, adjusted meta foreground).
      The loss is BAM's main plus ``aux_weight`` times the meta learner's (``aux_weight1``);
      the base learner is not trained (its loss, ``aux_weight2``, does not reach the meta
      learner's parameters and needs base-class labels the episodes do not carry).

    Official checkpoint key map (``train_epoch_*.pth``/``best.pth`` of ``train.py``):
    ``learner_base.0.*`` -> ``base_learner.ppm.*``, ``learner_base.1.*`` -> ``base_learner.cls.*``;
    every other head key keeps its name; ``layer0.*`` .. ``layer4.*`` are the encoder.

    Training as ``train.py`` (``tests/test_training_parity.py``): the base learner frozen with
    its BatchNorm in eval and, under the ``bam`` preset, its ``Dropout2d`` active
    (:attr:`base_learner_dropout`); the shots' weights applied to the priors outside
    ``no_grad``, so ``kshot_rw`` learns from them (``BAM.py:269``).

    Deviations: shots batched; the episode's own class is left out of the base learner's
    foreground whenever the episode's class is a base class (BAM: in training only, where it
    always is), so that validation on base-class episodes (this project's, which never sees the
    novel classes) is meaningful; on the novel test classes both use every base class. The loss
    is the task's cross-entropy at the label's size (the ``bam`` preset: over the global batch's
    labelled pixels, BAM's on one device).

    Args:
        features: The encoder's outputs (:attr:`backbones.Backbone.output_info`).
        base_learner: a :mod:`tasks.semantic` checkpoint (``.ckpt``) of this fold or one of
            BAM's released base learners (``initmodel/PSPNet/<dataset>/split<k>/<arch>/best.pth``);
            its decoder becomes the base learner and its encoder tensors the task's frozen
            encoder (which must be configured as the one it was trained with). Cleared in the
            checkpoints this model writes (they hold the tensors).
        num_base_classes: the base learner's foreground classes (PASCAL-5i 15, COCO-20i 60);
            read from ``base_learner`` when it is given.
        shots: K, which ``kshot_rw`` is built for (``--data.shots``).
        kshot_trans_dim: hidden channels of ``kshot_rw`` (official 2; 0: one K -> K conv).
        reduce_dim: channels of the reduced features (official 256).
        aux_weight: weight of the meta learner's loss (official ``aux_weight1`` 1.0).
        dropout: Dropout2d probability of ``down_query``/``down_supp`` (official 0.5).
        base_learner_trusted: unpickle ``base_learner`` fully (only a file you trust).
    """

    official_paper = "BAM"
    official_signature = "gram_merge.weight"
    official_renames = (("learner_base.0.", "base_learner.ppm."),
                        ("learner_base.1.", "base_learner.cls."))  # fmt: skip
    official_encoder: ClassVar[Mapping[str, Any]] = FeatureEnrichment.official_encoder
    #: the task keeps the encoder frozen: the base learner reads its deepest stage
    requires_frozen_backbone: ClassVar[bool] = True

    def __init__(
        self,
        features: FeaturePyramid,
        base_learner: str | None = None,
        num_base_classes: int = 15,
        shots: int = 1,
        kshot_trans_dim: int = 2,
        reduce_dim: int = 256,
        aux_weight: float = 1.0,
        dropout: float = 0.5,
        base_learner_trusted: bool = False,
    ) -> None:
        super().__init__()
        check_dropout(self, dropout=dropout)
        if shots < 1 or kshot_trans_dim < 0 or num_base_classes < 1:
            raise ValueError(
                f"BAMHead shots={shots} (expected >= 1), kshot_trans_dim={kshot_trans_dim} "
                f"(expected >= 0), num_base_classes={num_base_classes} (expected >= 1)"
            )
        loaded = None
        if base_learner is not None:
            loaded = read_base_learner(base_learner, base_learner_trusted)
            num_base_classes = loaded.decoder["cls.4.weight"].shape[0] - 1
        self.num_base_classes, self.shots, self.aux_weight = num_base_classes, shots, aux_weight
        self.mid_level = mid_level_layers(features)
        self.prior_layer = features.stage(-1).name
        self.support_mask_at = features.stage(-2).name
        self.low_level = self.mid_level[1]  # ``low_fea: layer2``
        self.in_features = (*self.mid_level, self.prior_layer)
        channels = mid_level_channels(features)
        self.down_query = mid_level_reduction(channels, reduce_dim, dropout)
        self.down_supp = mid_level_reduction(channels, reduce_dim, dropout)
        self.init_merge = nn.Sequential(
            nn.Conv2d(2 * reduce_dim + 1, reduce_dim, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.ASPP_meta = ASPP(reduce_dim)
        self.res1_meta = nn.Sequential(
            nn.Conv2d(5 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.res2_meta = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.cls_meta = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(reduce_dim, 2, 1),
        )
        self.gram_merge = self._merge()
        self.cls_merge = self._merge()
        if shots > 1:
            if kshot_trans_dim == 0:
                self.kshot_rw = nn.Conv2d(shots, shots, 1, bias=False)
                nn.init.constant_(self.kshot_rw.weight, 1 / shots)
            else:
                self.kshot_rw = nn.Sequential(
                    nn.Conv2d(shots, kshot_trans_dim, 1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(kshot_trans_dim, shots, 1),
                )
        self.base_learner = PSPDecoder(features, num_base_classes + 1).requires_grad_(False)
        #: where :meth:`prepare_backbone` loads the encoder from (once, when the model is built)
        self.base_learner_source: BaseLearner | None = loaded
        #: the file's record without its tensors, for the split check of :meth:`setup`
        self.base_learner_record = None if loaded is None else replace(loaded, decoder={})
        #: dataset class -> the base learner's channel (0: not a base class), from :meth:`setup`
        self.base_channel_of: Tensor | None = None
        #: the base learner's ``Dropout2d`` active in training, as BAM's ``train.py`` leaves it
        #: (``model.train()``, then ``fix_bn`` on BatchNorm only); set by the task from the
        #: protocol's ``base_learner_dropout`` (the ``bam`` preset), else off: a frozen model
        #: is deterministic
        self.base_learner_dropout = False
        #: whether the base learner holds trained tensors (a file's, a checkpoint's): training
        #: on a random one would be silently wrong, so the task refuses to fit without them
        self.base_learner_ready = False
        if loaded is not None:
            self.base_learner.load_state_dict(loaded.decoder)
            self.base_learner_ready = True

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """A state dict with the base learner's tensors (a checkpoint of this model, an official
        one) makes the base learner ready."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        if f"{prefix}base_learner.cls.4.weight" in state_dict:
            self.base_learner_ready = True

    @staticmethod
    def _merge() -> nn.Conv2d:
        """A 2 -> 1 1x1 conv without bias initialised to pass its first input (``gram_merge``,
        ``cls_merge``)."""
        merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            merge.weight.copy_(torch.tensor([1.0, 0.0]).view_as(merge.weight))
        return merge

    @classmethod
    def official_options(cls, head_state: Mapping[str, Tensor]) -> dict[str, Any]:
        """K from ``kshot_rw`` (``K -> kshot_trans_dim -> K`` convs, or one ``K -> K`` conv;
        none in a 1-shot file) and the base classes from the base learner's classifier
        (``learner_base.1.4``: background + classes): a released K-shot or COCO model loads
        with no head option."""
        options: dict[str, Any] = {"shots": 1}
        if "kshot_rw.0.weight" in head_state:
            hidden, shots = head_state["kshot_rw.0.weight"].shape[:2]
            options = {"shots": int(shots), "kshot_trans_dim": int(hidden)}
        elif "kshot_rw.weight" in head_state:
            options = {"shots": int(head_state["kshot_rw.weight"].shape[0]), "kshot_trans_dim": 0}
        classifier = head_state.get("learner_base.1.4.weight")
        if classifier is not None:
            options["num_base_classes"] = int(classifier.shape[0]) - 1
        return options

    def prepare_backbone(self, backbone: Backbone) -> Backbone:
        """The configured encoder with the base learner file's encoder tensors, once (a model
        rebuilt from a checkpoint has them in its state)."""
        source, self.base_learner_source = self.base_learner_source, None
        return backbone if source is None else base_learner_encoder(source, backbone)

    def setup(self, datamodule: Any) -> None:
        """Refuse episodes of another K than ``kshot_rw``'s and a base learner of another class
        split; map each dataset class to its base-learner channel; the protocol's
        ``base_learner_dropout`` (the ``bam`` preset)."""
        shots = getattr(datamodule, "shots", self.shots)
        if shots != self.shots:
            raise ValueError(
                f"{type(self).__name__} is built for {self.shots}-shot episodes (its K-shot "
                f"reweighting kshot_rw; a released file sets it) but --data.shots is {shots}: "
                f"pass --data.shots {self.shots}, or build the head for {shots} with "
                f"--model.head.init_args.shots {shots}"
            )
        protocol = getattr(datamodule, "protocol", None) or {}
        self.base_learner_dropout = protocol.get("base_learner_dropout", False)
        if self.base_learner_record is not None:
            check_base_learner_split(
                self.base_learner_record, getattr(datamodule, "novel_classes", None)
            )
        base_classes = getattr(datamodule, "base_classes", None)
        self.base_channel_of = None  # no data's classes: every episode's class counts as novel
        if base_classes is not None:
            self.base_channel_of = base_channel_lookup(
                base_classes, datamodule.num_classes, self.num_base_classes
            )

    def check_ready_to_fit(self) -> None:
        """Training on a random base learner would be silently wrong."""
        if not self.base_learner_ready:
            raise ValueError(
                f"{type(self).__name__} has no trained base learner to fit with: pass "
                "--model.head.init_args.base_learner (a tasks.semantic checkpoint of this fold, "
                "or BAM's initmodel/PSPNet/<dataset>/split<k>/<arch>/best.pth)"
            )

    @property
    def init_args(self) -> dict[str, Any]:
        """The options with ``base_learner`` cleared and its class count recorded: a
        checkpoint of this model holds the base learner's tensors."""
        return {
            **super().init_args,
            "base_learner": None,
            "base_learner_trusted": False,
            "num_base_classes": self.num_base_classes,
        }

    def train(self, mode: bool = True) -> BAMHead:
        """The base learner stays in eval mode (frozen, as BAM's ``freeze_modules``), but for
        its dropout under :attr:`base_learner_dropout`."""
        super().train(mode)
        self.base_learner.eval()
        if mode and self.base_learner_dropout:
            for module in self.base_learner.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.train()
        return self

    def shot_weights(self, distances: Tensor) -> Tensor:
        """[B, K] scene distances -> [B, K] weights of the shots (``kshot_rw`` on the sorted
        distances, back in shot order, softmax; ones for one shot)."""
        if distances.shape[1] == 1:
            return torch.ones_like(distances)
        ordered, order = distances.sort(1)
        weights = self.kshot_rw(ordered[..., None, None].to(self.down_query[0].weight.dtype))
        return weights[..., 0, 0].float().gather(1, order.argsort(1)).softmax(1)

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query; see :mod:`tasks.heads` for shapes. ``class_ids`` [B]: each
        episode's dataset class, which the base learner's map leaves out when it is a base
        class (:meth:`setup` maps classes to channels); ``None``, or no map: every episode's
        class is novel."""
        check_inputs(query_feats, support_feats, support_masks, self.in_features)
        batch, shots = support_masks.shape[:2]
        if shots != self.shots:
            raise ValueError(
                f"BAMHead was built for shots={self.shots} (its K-shot reweighting) but the "
                f"episodes have {shots}; set --model.head.init_args.shots {shots}"
            )
        query = self.down_query(mid_level_features(query_feats, self.mid_level))
        support = self.down_supp(mid_level_features(support_feats, self.mid_level))
        size = query.shape[-2:]
        deeper, low = self.mid_level
        low_query, low_support = query_feats[low], support_feats[low]
        if low_query.shape[-2:] != query_feats[deeper].shape[-2:]:  # VGG-16: at layer3's size
            low_query = resize(low_query, size)
            low_support = resize(low_support.flatten(0, 1), size).unflatten(0, (batch, shots))
        distances = scene_distance(low_query, low_support)  # [B, K]
        weights = self.shot_weights(distances)
        distance = (weights * distances).sum(1)  # [B]
        masks = foreground_masks(support_masks, size)
        prototypes = masked_average_pooling(support, masks).view(batch, shots, -1)
        prototype = (weights[..., None] * prototypes).sum(1).to(query.dtype)
        with torch.no_grad():
            priors = shot_priors(
                query_feats[self.prior_layer], support_feats[self.prior_layer], support_masks, size
            )
            base_logits = self.base_learner.decode(query_feats[self.prior_layer])
            if base_logits.shape[-2:] != size:  # an encoder whose deepest stage is smaller
                base_logits = resize(base_logits, size)
        # weighted outside no_grad: the shot weights learn from the prior too (``BAM.py:269``)
        prior = (weights[..., None, None] * priors).sum(1, keepdim=True)
        merged = torch.cat(
            [query, prototype[..., None, None].expand_as(query), prior.to(query.dtype)], 1
        )
        meta = self.res1_meta(self.ASPP_meta(self.init_merge(merged)))
        meta_logits = self.cls_meta(self.res2_meta(meta) + meta)
        base_channels = None
        if class_ids is not None and self.base_channel_of is not None:
            base_channels = self.base_channel_of.to(class_ids.device)[class_ids]
        logits = self.ensemble(meta_logits, base_logits, distance, base_channels)
        return HeadOutput(logits=logits, aux_logits=[meta_logits], aux_weight=self.aux_weight)

    def ensemble(
        self,
        meta_logits: Tensor,
        base_logits: Tensor,
        distance: Tensor,
        base_channels: Tensor | None,
    ) -> Tensor:
        """BAM's learner ensemble: [B, 2, h, w] outputs (background, foreground), in fp32."""
        with torch.autocast(meta_logits.device.type, enabled=False):
            meta = meta_logits.float().softmax(1)
            base = base_logits.float().softmax(1)
            base_foreground = base[:, 1:].sum(1, keepdim=True)
            if base_channels is not None:  # the episode's own class: not "what not to segment"
                index = base_channels.view(-1, 1, 1, 1).expand_as(base_foreground)
                known = (base_channels > 0).view(-1, 1, 1, 1)
                base_foreground = base_foreground - base.gather(1, index) * known
            scene = distance.float().view(-1, 1, 1, 1).expand_as(base_foreground)
            gram, merge = self.gram_merge.weight.float(), self.cls_merge.weight.float()
            background = F.conv2d(torch.cat([meta[:, :1], scene], 1), gram)
            foreground = F.conv2d(torch.cat([meta[:, 1:], scene], 1), gram)
            merged = F.conv2d(torch.cat([background, base_foreground], 1), merge)
            return torch.cat([merged, foreground], 1)


@dataclass(frozen=True)
class BaseLearner:
    """A base learner file: its decoder tensors, what the task needs to load its encoder (the
    file, and the encoder it was trained with when the file records it), and the data settings
    it was trained with (:mod:`tasks.callbacks.data_settings`; ``{}`` for BAM's files)."""

    path: str
    trusted: bool
    decoder: dict[str, Tensor]
    backbone: dict[str, Any] | None
    data: dict[str, Any]


def read_base_learner(path: str, trusted: bool = False) -> BaseLearner:
    """A :mod:`tasks.semantic` checkpoint (``decoder.*``: a :class:`~tasks.decoders.PSPDecoder`
    with BAM's options) or one of BAM's released ``best.pth`` (``module.``-prefixed
    ``layer0..4``, ``ppm.*``, ``cls.*``)."""
    option = "--model.head.init_args.base_learner_trusted true"
    checkpoint = read_checkpoint(path, trusted, option=option)
    state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    backbone, data = None, {}
    if "pytorch-lightning_version" in checkpoint:
        data = stored_settings(checkpoint)
        parameters = checkpoint.get("hyper_parameters", {})
        description = parameters.get("decoder", {})
        defaults = {
            name: plain(p.default)
            for name, p in inspect.signature(PSPDecoder.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        if description.get("class_path") != class_path(PSPDecoder) or any(
            defaults.get(key) != value for key, value in description.get("init_args", {}).items()
        ):
            raise WeightsError(
                f"base_learner={path!r} is not a tasks.semantic model with BAM's PSPNet decoder "
                f"(PSPDecoder with its defaults {defaults}); found {description}"
            )
        prefix = "decoder."
        decoder = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        backbone = parameters.get("backbone")
    else:
        decoder = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
    if "cls.4.weight" not in decoder:
        raise WeightsError(
            f"base_learner={path!r} holds no base learner: expected a tasks.semantic checkpoint "
            f"or BAM's initmodel/PSPNet/.../best.pth (ppm.*, cls.*, layer0..4), found keys "
            f"{sorted(state)[:8]}"
        )
    return BaseLearner(str(Path(path)), trusted, decoder, backbone, data)


def base_learner_encoder(source: BaseLearner, configured: Backbone) -> Backbone:
    """The configured encoder rebuilt with the base learner file's encoder tensors (its
    ``weights`` option), after checking that a file recording its encoder records this one."""
    description = configured.describe()
    if source.backbone is not None and source.backbone != description:
        raise ValueError(
            f"base_learner={source.path!r} was trained with the encoder {source.backbone}, but "
            f"the model is configured with {description}; configure --model.backbone as the "
            "base learner's"
        )
    init_args = dict(description["init_args"])
    if "weights" not in init_args:
        raise ValueError(
            f"{description['class_path']} has no weights option to load the encoder of "
            f"base_learner={source.path!r} from"
        )
    init_args["weights"] = source.path
    if "weights_trusted" in init_args:
        init_args["weights_trusted"] = source.trusted
    return build_described({**description, "init_args": init_args})


def check_base_learner_split(source: BaseLearner, novel_classes: list[int] | None) -> None:
    """Refuse a base learner trained on another fold's class split (its recorded novel classes
    differ from the data's): it learned some of this fold's novel classes as base classes, which
    would leak into every novel-class prediction. The count check of
    :func:`base_channel_lookup` cannot see it (every PASCAL-5i fold has 15 base classes)."""
    trained = source.data.get("novel_classes")
    if trained is None or novel_classes is None or sorted(trained) == sorted(novel_classes):
        return
    raise ValueError(
        f"base_learner={source.path!r} was trained with fold {source.data.get('fold')!r} "
        f"(novel classes {sorted(trained)}) but the data's novel classes are "
        f"{sorted(novel_classes)}: it has learned some of them as base classes, which would "
        "leak; train the base learner on this fold (python -m tasks.semantic fit --data.fold "
        "<this fold>)"
    )


def base_channel_lookup(base_classes: list[int], num_classes: int, known: int) -> Tensor:
    """[num_classes] long: a fold's base class ``c`` -> its base learner's channel (1 + its rank
    among the base classes, BAM's ``sub_list.index(c) + 1``), 0 for every other class."""
    if len(base_classes) != known:
        raise ValueError(
            f"the head's base learner knows {known} base classes but the data's fold has "
            f"{len(base_classes)}; train the base learner on this dataset and fold"
        )
    lookup = torch.zeros(num_classes, dtype=torch.long)
    lookup[torch.tensor(sorted(base_classes))] = torch.arange(1, known + 1)
    return lookup
