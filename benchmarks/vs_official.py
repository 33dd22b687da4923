"""Every head against its official model, step for step, on one device: episodes per second of
the training step and of the evaluation forward, the ratio, peak device memory, and a check that
both sides compute the same logits.

The official code is imported from a checkout of the paper's repository, which this project does
not ship and does not depend on (``--official-root``: the checkout, or a folder holding it under
the repository's name)::

    git clone https://github.com/dvlab-research/PFENet official/PFENet
    git clone https://github.com/Reagan1311/ASGNet official/ASGNet
    git clone https://github.com/juhongm999/hsnet official/hsnet
    git clone https://github.com/chunbolang/BAM official/BAM
    git clone https://github.com/pawn-sxy/DCAMA official/DCAMA
    python -m benchmarks.vs_official --official-root official --method pfenet asgnet hsnet bam \\
        --device cuda --shots 1 5
    python -m benchmarks.vs_official --official-root official/PFENet --method pfenet \\
        --device cpu --size 129 --batch 2 --threads 1

What runs, for each method and shot count:

* The official model at its paper's settings (PFENet and ASGNet: ResNet-50 PSPNet encoder,
  473 px, batch 4, bins 60/30/15/8, SGD over the groups of their ``train.py`` at 10x
  ``base_lr``; HSNet: torchvision ResNet-50, 400 px, batch 20, Adam over
  ``model.parameters()``), with random
  weights: nothing is downloaded or read (PFENet's ``pretrained`` argument is passed ``False``;
  ASGNet's hard-coded ``pretrained = True`` and HSNet's torchvision ``pretrained=True`` are
  patched for the construction, and on CPU their hard-coded ``.cuda()`` calls are sent to the
  CPU while official code runs; their files are never edited). The backbone's BatchNorm
  statistics are first calibrated on one random batch, so that evaluation activations are of
  unit scale rather than growing through 16 blocks of random weights.
* BAM (``model/BAM.py`` ``OneModel(args, cls_type='Base')``, ResNet-50, 473 px, global batch 8,
  ``low_fea: layer2``, ``kshot_trans_dim: 2``): its constructor reads the fold's base learner
  from ``initmodel/PSPNet/pascal/split0/resnet50/best.pth`` under the working directory, so the
  benchmark first writes a random ``model/PSPNet.py`` ``OneModel`` there (``{"state_dict":
  ...}``) in a temporary directory and builds BAM in it; ``pretrained=True`` is patched as for
  ASGNet, the plotting and weak-annotation packages its ``util/util.py`` imports at top level
  (matplotlib, seaborn, pandas, networkx, scikit-image, scikit-learn) are stubbed for the import
  where they are not installed, and on CPU its training forward's ``torch.arange(...,
  device='cuda')`` is sent to the CPU. Training: ``model.train()`` with ``fix_bn`` (every
  BatchNorm in eval mode), ``freeze_modules``, SGD over ``get_optim``'s meta-learner groups at
  10x ``base_lr`` (``index_split: -1``), loss ``main + aux1 + aux2`` (``aux_weight1/2: 1.0``; the
  base learner's ``aux2`` carries no gradient); the episodes' classes are fold 0's first base
  classes in training (``cat_idx``; the project passes the episodes' ``class_ids``, which
  :class:`~tasks.heads.BAMHead` maps to channel ``cat_idx + 1``,
  :func:`tasks.heads.bam.base_channel_lookup`) and its novel classes in evaluation (the official
  evaluation sums every base class; so does the project for a novel class). Besides the eval
  logits, the training losses (main and meta) are compared with dropout off.
* Its state dict saved in the official layout (``{"epoch", "state_dict"}`` with DataParallel's
  ``module.`` for PFENet/ASGNet/BAM, HSNet's bare ``module.`` state dict) and loaded into the
  project's model through ``FewShotSegmentation(official_checkpoint=...)`` (the
  ``--model.official_checkpoint`` option): the same weights on both sides. The project's
  optimizer is its ``configure_optimizers`` under the paper's config (``configs/segment/
  pfenet_pascal.yaml``, ``pascal.yaml``, ``hsnet_pascal.yaml``, ``bam_pascal.yaml``); PFENet's and
  ASGNet's
  backbone BatchNorm uses batch statistics in training on both sides (their ``model.train()``,
  the project's ``backbone_norm: batch`` of the ``pfenet`` and ``asgnet`` protocols).
* Eval logits at the input resolution compared first, on the fresh weights, in fp32 with TF32
  off (asserted within ``--tolerance`` of the official logits' largest magnitude), with the
  share of pixels predicted alike; the fast mode's difference is reported, not asserted: bf16
  rounding grows through a random-weight encoder (about 60% of layer4's largest magnitude
  for PFENet's at 129 px), a property of random weights (trained ones are not measured here).
* Then, alternating in one process on one synthetic batch (:func:`benchmarks.common.
  synthetic_batch`): the training step (forward, loss with the auxiliary losses, backward,
  optimizer step; no schedule) and the evaluation forward to the predicted mask at the input
  resolution (PFENet/ASGNet ``output.max(1)``; HSNet ``predict_mask_nshot``, which votes for
  K > 1). The project runs fp32 and its fastest mode (bf16 autocast + channels_last, compiled on
  CUDA); the official code runs as it ships (fp32).

Small inputs: PFENet's and ASGNet's absolute bins are clamped to the feature size on both sides
(the project clamps them, the official code would upsample), and ASGNet's superpixel area is
scaled with the feature area so that clustering runs with the paper's number of superpixels.
ASGNet's seeds are the official loader's work (``util/seed_init.py``, on the CPU), computed once
before timing; the project places them inside its step. HSNet trains with one shot only; for
K > 1 the official training step here runs its forward once per shot and averages the logits,
as the project's step does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.common import (
    add_device_arguments,
    describe,
    markdown_row,
    markdown_table,
    setup_device,
    synthetic_batch,
    time_alternating,
    train_step,
)
from benchmarks.segment import MODES, Mode, peak_step_memory
from tasks.heads import ASGNetHead, BAMHead, DCAMAHead, HSNetHead, PFENetHead
from tasks.heads.bam import base_channel_lookup
from tasks.heads.common import vote
from tasks.scoring import upsample
from tasks.segment import FewShotSegmentation, scored_logits

#: Top-level packages of the official repositories (``model``, ``util``...), which the three
#: share by name: each import runs with its own checkout first on ``sys.path`` and leaves no
#: entry behind in ``sys.modules``.
OFFICIAL_PACKAGES = ("model", "util", "common", "data")

#: The paper's bins and the feature size they assume (473 px at output stride 8).
PAPER_BINS = (60, 30, 15, 8)
PAPER_FEATURE = 60
#: ASGNet's mask pixels per superpixel at the paper's feature size (``avg_sp_area``).
PAPER_SUPERPIXEL_AREA = 100.0

#: Packages BAM's ``util/util.py`` (and its ``util/get_weak_anns.py``) import at top level for
#: plots and weak annotations, which its model does not use: stubbed where not installed.
PLOTTING_PACKAGES = ("matplotlib", "seaborn", "pandas", "networkx", "skimage", "sklearn")

#: PASCAL-5i fold 0 (BAM's ``split: 0``): the dataset's classes, the novel ones (0-based class
#: ids, as the project's datamodules number them) and the base ones, in the base learner's
#: channel order (channel ``1 + rank``: BAM's ``sub_list.index(c) + 1``).
PASCAL_CLASSES = 20
FOLD0_NOVEL = tuple(range(5))
FOLD0_BASE = tuple(c for c in range(PASCAL_CLASSES) if c not in FOLD0_NOVEL)


class OfficialCodeMissing(SystemExit):
    """The checkout named by ``--official-root`` lacks the method's repository."""


@dataclass(frozen=True)
class Recipe:
    """A method's paper settings on both sides."""

    repo: str  # github owner/name
    marker: str  # a file every checkout of the repository holds
    size: int
    batch: int
    head: type[nn.Module]
    project: dict[str, Any] = field(default_factory=dict)  # FewShotSegmentation options
    batch_norm_statistics: bool = False  # backbone BN in train mode during training


RECIPES = {
    "pfenet": Recipe(  # configs/segment/pfenet_pascal.yaml: base_lr 0.0025 at 10x
        "dvlab-research/PFENet", "model/PFENet.py", 473, 4, PFENetHead,
        {"optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "weight_decay": 1e-4},
        batch_norm_statistics=True,
    ),
    "asgnet": Recipe(
        "Reagan1311/ASGNet", "model/asgnet.py", 473, 4, ASGNetHead,
        {"optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "weight_decay": 1e-4},
        batch_norm_statistics=True,
    ),
    "hsnet": Recipe(
        "juhongm999/hsnet", "model/hsnet.py", 400, 20, HSNetHead,
        {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "poly_power": 0.0},
    ),
    "bam": Recipe(  # configs/segment/bam_pascal.yaml: base_lr 0.005 at 10x, global batch 8
        "chunbolang/BAM", "model/BAM.py", 473, 8, BAMHead,
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    ),
    "dcama": Recipe(  # configs/segment/dcama_pascal.yaml: --bsz 12 per GPU
        "pawn-sxy/DCAMA", "model/DCAMA.py", 384, 12, DCAMAHead,
        {"optimizer": "nesterov", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4,
         "poly_power": 0.0},
    ),
}  # fmt: skip


def official_checkout(root: Path, method: str) -> Path:
    """The checkout of ``method``'s repository: ``root`` itself or ``root/<repository name>``.

    Raises:
        OfficialCodeMissing: naming the file looked for and how to fetch the repository.
    """
    recipe = RECIPES[method]
    name = recipe.repo.split("/")[1]
    for candidate in (root, root / name):
        if (candidate / recipe.marker).is_file():
            return candidate
    raise OfficialCodeMissing(
        f"--official-root {str(root)!r} holds no checkout of {recipe.repo} for --method "
        f"{method}: neither {root / recipe.marker} nor {root / name / recipe.marker} exists; "
        f"fetch it with: git clone https://github.com/{recipe.repo} {root / name}"
    )


@contextlib.contextmanager
def official_imports(checkout: Path) -> Iterator[None]:
    """Import from ``checkout`` (its packages shadow nothing of this project's), then forget
    its modules so that another repository's ``model`` package can be imported next."""
    shadowed = {
        name: module
        for name, module in sys.modules.items()
        if name.partition(".")[0] in OFFICIAL_PACKAGES
    }
    for name in shadowed:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    try:
        yield
    finally:
        sys.path.remove(str(checkout))
        for name in [n for n in sys.modules if n.partition(".")[0] in OFFICIAL_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(shadowed)


class _Stub(ModuleType):
    """A placeholder module: any public attribute is another placeholder."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`_Stub` modules for ``packages`` (and their submodules), consulted after
    every real finder."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = tuple(packages)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.partition(".")[0] not in self.packages:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = _Stub(spec.name)
        module.__path__ = []  # a package: its submodules are stubs too
        return module

    def exec_module(self, module: ModuleType) -> None:
        pass


@contextlib.contextmanager
def stubbed_imports(packages: Sequence[str]) -> Iterator[list[str]]:
    """Those of ``packages`` that are not installed import as placeholders while the context
    lasts (their names yielded), and are forgotten after it; installed ones import as usual."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    finder = _StubFinder(missing)
    sys.meta_path.append(finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.partition(".")[0] in missing]:
            del sys.modules[name]


@contextlib.contextmanager
def cuda_calls_on(device: torch.device) -> Iterator[None]:
    """The official code's hard-coded ``tensor.cuda()`` (forward defaults, auxiliary loss,
    ASGNet's clustering) and ``torch.arange(..., device='cuda')`` (BAM's training ensemble)
    send tensors to ``device`` while it runs (nothing to do on CUDA)."""
    if device.type == "cuda":
        yield
        return
    original, arange, target = torch.Tensor.cuda, torch.arange, device

    def arange_on_device(*args: Any, device: Any = None, **kwargs: Any) -> Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = target
        return arange(*args, device=device, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(target)  # type: ignore[method-assign]
    torch.arange = arange_on_device  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]
        torch.arange = arange


@contextlib.contextmanager
def no_pretrained(module: Any, name: str, **random: Any) -> Iterator[None]:
    """``module.<name>(pretrained=True)`` builds random weights instead of loading any: its
    ``pretrained``/``weights`` arguments replaced by ``random`` (``pretrained=False`` for the
    PSPNet encoders' own ``resnet50``, ``weights=None`` for torchvision's)."""
    build = getattr(module, name)

    def random_weights(*args: Any, **kwargs: Any) -> nn.Module:
        kwargs.pop("pretrained", None)
        kwargs.pop("weights", None)
        return build(*args, **kwargs, **random)

    setattr(module, name, random_weights)
    try:
        yield
    finally:
        setattr(module, name, build)


@contextlib.contextmanager
def working_directory(path: str | Path) -> Iterator[None]:
    """``os.chdir(path)`` while the context lasts (``contextlib.chdir`` is Python 3.11+)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions (on by default for convolutions), so that the
    logit check compares float32 results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def calibrate_batch_norm(backbone: Callable[[Tensor], object], modules: nn.Module, x: Tensor):
    """Running statistics of every BatchNorm in ``modules`` := those of one batch ``x``."""
    norms = [m for m in modules.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives its own statistics
    was_training = modules.training
    modules.train()
    with torch.no_grad():
        backbone(x)
    modules.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def feature_side(size: int) -> int:
    """PFENet/ASGNet's layer3 side at output stride 8 (their inputs are 8k + 1)."""
    return (size - 1) // 8 + 1


def pyramid_bins(size: int) -> list[int]:
    """The paper's bins, clamped to the feature side as the project clamps them."""
    return [min(b, feature_side(size)) for b in PAPER_BINS]


def superpixel_area(size: int) -> float:
    """ASGNet's ``avg_sp_area`` scaled with the feature area (the paper's 100 at 60 x 60)."""
    return PAPER_SUPERPIXEL_AREA * min(1.0, (feature_side(size) / PAPER_FEATURE) ** 2)


class Official:
    """One official model with its optimizer: ``train(batch)``, ``eval(batch)`` (predicted
    masks), ``logits(batch)`` (eval logits at the input size, [B, K, 2, H, W] per shot for
    HSNet, else [B, 2, H, W])."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, checkout: Path, shots: int, size: int, device: torch.device) -> None:
        self.device, self.shots, self.size = device, shots, size
        with (
            official_imports(checkout),
            cuda_calls_on(device),
            contextlib.redirect_stdout(
                io.StringIO()  # the official constructors print their settings
            ),
        ):
            self.build(checkout)
        self.model.to(device)

    def build(self, checkout: Path) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The state dict as the official ``train.py`` saves it (DataParallel keys)."""
        state = {f"module.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"epoch": 0, "state_dict": state}

    def prepare(self, batch: dict[str, Any]) -> None:
        """Per-batch loader work of the official pipeline, done before timing."""

    def training_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch both sides train on (BAM: episodes of base classes)."""
        return batch

    def train(self, batch: dict[str, Any]) -> None:
        with cuda_calls_on(self.device):
            self.model.train()
            loss = self.loss(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def loss(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def eval(self, batch: dict[str, Any]) -> Tensor:
        self.model.eval()
        with cuda_calls_on(self.device), torch.no_grad():
            return self.forward(batch).max(1)[1]

    def logits(self, batch: dict[str, Any]) -> Tensor:
        self.model.eval()
        with cuda_calls_on(self.device), torch.no_grad():
            return self.forward(batch)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class OfficialPFENet(Official):
    """dvlab-research/PFENet ``model/PFENet.py`` and the optimizer of its ``train.py``."""

    def build(self, checkout: Path) -> None:
        from model.PFENet import PFENet

        model = PFENet(
            layers=50, classes=2, zoom_factor=8, criterion=nn.CrossEntropyLoss(ignore_index=255),
            BatchNorm=nn.BatchNorm2d, pretrained=False, shot=self.shots,
            ppm_scales=pyramid_bins(self.size), vgg=False,
        )  # fmt: skip
        self.model = self.freeze(model)
        self.optimizer = torch.optim.SGD(
            [{"params": getattr(model, name).parameters()} for name in self.head_modules],
            lr=0.025, momentum=0.9, weight_decay=1e-4,  # base_lr 0.0025 at poly's 10x
        )  # fmt: skip

    head_modules = (
        "down_query", "down_supp", "init_merge", "alpha_conv", "beta_conv", "inner_cls",
        "res1", "res2", "cls",
    )  # fmt: skip

    def freeze(self, model: nn.Module) -> nn.Module:
        """``train.py``: layer0..layer4 ``requires_grad = False``; BatchNorm statistics
        calibrated (see the module docstring)."""
        layers = nn.ModuleList(getattr(model, f"layer{i}") for i in range(5))
        layers.requires_grad_(False)
        x = torch.randn(2, 3, self.size, self.size)
        calibrate_batch_norm(lambda x: nn.Sequential(*layers)(x), layers, x)
        return model

    def loss(self, batch: dict[str, Any]) -> Tensor:
        _, main_loss, aux_loss = self.model(
            s_x=batch["support_images"], s_y=batch["support_masks"], x=batch["query_image"],
            y=batch["query_mask"], **self.extra(batch),
        )  # fmt: skip
        return main_loss + 1.0 * aux_loss  # aux_weight: 1.0

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(
            s_x=batch["support_images"], s_y=batch["support_masks"], x=batch["query_image"],
            **self.extra(batch),
        )  # fmt: skip

    def extra(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {}


class OfficialASGNet(OfficialPFENet):
    """Reagan1311/ASGNet ``model/asgnet.py`` (pyramid variant), its ``_optimizer`` and the
    loader's seeds (``util/seed_init.py``)."""

    def build(self, checkout: Path) -> None:
        import model.resnet
        from model.asgnet import Model
        from util.seed_init import place_seed_points

        self.place_seed_points = place_seed_points
        args = SimpleNamespace(
            layers=50, classes=2, sync_bn=False, zoom_factor=8, shot=self.shots, train_iter=10,
            eval_iter=5, pyramid=True, ppm_scales=pyramid_bins(self.size),
        )  # fmt: skip
        with no_pretrained(model.resnet, "resnet50", pretrained=False):
            self.model = self.freeze(Model(args))
        self.optimizer = self.model._optimizer(
            SimpleNamespace(base_lr=0.0025, momentum=0.9, weight_decay=1e-4)
        )
        for group in self.optimizer.param_groups:  # ``poly_learning_rate``'s 10x
            group["lr"] = 0.025

    def prepare(self, batch: dict[str, Any]) -> None:
        """``util/dataset.py``: one ``place_seed_points`` per support label, on the CPU."""
        area = superpixel_area(self.size)
        masks = (batch["support_masks"] == 1).float().cpu()
        seeds = [
            [self.place_seed_points(m, 8, 5, area) for m in shots] for shots in masks.unbind(0)
        ]
        self.seeds = torch.stack([torch.stack(s) for s in seeds]).to(self.device)

    def extra(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"s_seed": self.seeds}


class OfficialHSNet(Official):
    """juhongm999/hsnet ``model/hsnet.py`` with the optimizer and objective of its
    ``train.py``; evaluation by ``predict_mask_nshot`` (``test.py``)."""

    def build(self, checkout: Path) -> None:
        from model.hsnet import HypercorrSqueezeNetwork

        with no_pretrained(torchvision.models.resnet, "resnet50", weights=None):
            model = HypercorrSqueezeNetwork("resnet50", use_original_imgsize=False)
        x = torch.randn(2, 3, self.size, self.size)
        calibrate_batch_norm(model.backbone, model.backbone, x)
        model.backbone.eval()
        self.model = model
        self.optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}])

    def state_dict(self) -> dict[str, Any]:
        """``Logger.save_model_miou``: the DataParallel model's bare state dict."""
        return super().state_dict()["state_dict"]

    def shot_logits(self, batch: dict[str, Any]) -> list[Tensor]:
        return [
            self.model(batch["query_image"], batch["support_images"][:, k],
                       batch["support_masks"][:, k])
            for k in range(self.shots)
        ]  # fmt: skip

    def train(self, batch: dict[str, Any]) -> None:
        self.model.train_mode()
        loss = self.model.compute_objective(
            torch.stack(self.shot_logits(batch)).mean(0), batch["query_mask"]
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def eval(self, batch: dict[str, Any]) -> Tensor:
        self.model.eval()
        episode = {
            "query_img": batch["query_image"],
            "support_imgs": batch["support_images"],
            "support_masks": batch["support_masks"],
        }
        with torch.no_grad():
            return self.model.predict_mask_nshot(episode, self.shots)

    def logits(self, batch: dict[str, Any]) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            logits = self.shot_logits(batch)
        return torch.stack(logits, 1) if self.shots > 1 else logits[0]


class OfficialBAM(Official):
    """chunbolang/BAM ``model/BAM.py`` ``OneModel(cls_type='Base')`` (ResNet-50, PASCAL-5i fold
    0) with ``train.py``'s optimizer, BatchNorm mode and loss."""

    #: ``initmodel/PSPNet/<data_set>/split<split>/resnet50/best.pth``: the base learner BAM's
    #: constructor reads from the working directory
    base_learner_path = Path("initmodel/PSPNet/pascal/split0/resnet50/best.pth")

    def build(self, checkout: Path) -> None:
        with stubbed_imports(PLOTTING_PACKAGES):
            import model.resnet
            from model.BAM import OneModel
            from model.PSPNet import OneModel as PSPNet

        args = SimpleNamespace(
            layers=50, zoom_factor=8, shot=self.shots, vgg=False, data_set="pascal",
            ignore_label=255, print_freq=10, split=0, low_fea="layer2", kshot_trans_dim=2,
            momentum=0.9, weight_decay=1e-4,
        )  # fmt: skip
        with (
            no_pretrained(model.resnet, "resnet50", pretrained=False),
            tempfile.TemporaryDirectory() as folder,
            working_directory(folder),
        ):
            self.base_learner_path.parent.mkdir(parents=True)
            torch.save({"state_dict": PSPNet(args).state_dict()}, self.base_learner_path)
            model = OneModel(args, cls_type="Base")
        base_lr = 0.005
        self.optimizer = model.get_optim(model, args, LR=base_lr)
        for group in self.optimizer.param_groups:  # poly_learning_rate, index_split -1: 10x
            group["lr"] = base_lr * 10
        model.freeze_modules(model)
        encoder = nn.Sequential(*(getattr(model, f"layer{i}") for i in range(5)))
        frozen = nn.ModuleList([encoder, model.learner_base])
        x = torch.randn(2, 3, self.size, self.size)
        calibrate_batch_norm(lambda x: model.learner_base(encoder(x)), frozen, x)
        with torch.no_grad():  # initialised to (1, 0), which would leave both unseen by the checks
            for merge in (model.gram_merge, model.cls_merge):
                merge.weight.copy_(torch.tensor([1.0, 0.5]).view_as(merge.weight))
        self.model = model

    def training_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The same episodes of fold 0's base classes (the evaluation batch's are its novel
        ones), as BAM trains."""
        offset = len(FOLD0_NOVEL)
        return {**batch, "class_id": batch["class_id"] % offset + offset}

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``forward``'s arguments as ``train.py`` passes them: ``cat_idx`` is the loader's
        ``subcls`` list (each episode's rank among the base classes) and ``y_b`` the query's
        base-class label (each foreground pixel at its class's channel)."""
        lookup = base_channel_lookup(list(FOLD0_BASE), PASCAL_CLASSES, len(FOLD0_BASE))
        channels = lookup.to(batch["class_id"].device)[batch["class_id"]]
        mask = batch["query_mask"]
        base_label = torch.where(mask == 1, channels.view(-1, 1, 1), mask)
        return {
            "x": batch["query_image"], "s_x": batch["support_images"],
            "s_y": batch["support_masks"], "y_m": mask, "y_b": base_label,
            "cat_idx": [channels - 1],
        }  # fmt: skip

    def train_mode(self) -> None:
        """``model.train()``, then ``fix_bn`` (``fix_bn: True``): every BatchNorm in eval mode."""
        self.model.train()
        for module in self.model.modules():
            if "BatchNorm" in type(module).__name__:
                module.eval()

    def train(self, batch: dict[str, Any]) -> None:
        with cuda_calls_on(self.device):
            self.train_mode()
            _, main_loss, aux_loss1, aux_loss2 = self.model(**self.inputs(batch))
            loss = main_loss + 1.0 * aux_loss1 + 1.0 * aux_loss2  # aux_weight1, aux_weight2
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def training_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(main, meta learner's) losses of the training forward with dropout off."""
        with cuda_calls_on(self.device), torch.no_grad():
            self.train_mode()
            dropout_off(self.model)
            _, main_loss, aux_loss1, _ = self.model(**self.inputs(batch))
        return main_loss, aux_loss1

    def forward(self, batch: dict[str, Any]) -> Tensor:
        final_out, _, _ = self.model(**self.inputs(batch))
        return final_out


class OfficialDCAMA(Official):
    """pawn-sxy/DCAMA ``model/DCAMA.py`` (ResNet-50: torchvision's, every bottleneck tapped
    before its last ReLU) with ``train.py``'s optimizer (SGD, Nesterov, weight decay ``lr /
    10``, over ``model.parameters()``), ``train_mode`` and ``compute_objective``. Its
    constructor reads the encoder's weights from a file: a random torchvision ResNet-50 is
    written to a temporary one. Training is 1-shot (``train.py``); K shots train through the
    official K-shot forward (``model.model(..., nshot)``, features under ``no_grad``).
    Evaluation by ``predict_mask_nshot``, batched for 1 shot and one episode at a time for K
    shots, as its ``test.sh`` runs them (at batch 1: with more episodes its K-shot path attends
    to other episodes' supports)."""

    def build(self, checkout: Path) -> None:
        from model.DCAMA import DCAMA

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "resnet50_a1h-35c100f8.pth"
            torch.save(torchvision.models.resnet50().state_dict(), path)
            model = DCAMA("resnet50", str(path), use_original_imgsize=False)
        x = torch.randn(2, 3, self.size, self.size)
        calibrate_batch_norm(model.feature_extractor, model.feature_extractor, x)
        self.model = model
        self.optimizer = torch.optim.SGD([{"params": model.parameters(), "lr": 1e-3,
                                           "momentum": 0.9, "weight_decay": 1e-4,
                                           "nesterov": True}])  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """``Logger.save_model_miou``: the DDP model's bare state dict."""
        return super().state_dict()["state_dict"]

    def episode_logits(self, batch: dict[str, Any]) -> Tensor:
        """``predict_mask_nshot`` before its argmax."""
        query, support = batch["query_image"], batch["support_images"]
        masks = batch["support_masks"].float()
        if self.shots == 1:
            return self.model(query, support[:, 0], masks[:, 0])
        with torch.no_grad():
            query_feats = self.model.extract_feats(query)
            support_feats = [self.model.extract_feats(support[:, k]) for k in range(self.shots)]
        return self.model.model(query_feats, support_feats, masks, self.shots)

    def train(self, batch: dict[str, Any]) -> None:
        self.model.train_mode()
        loss = self.model.compute_objective(self.episode_logits(batch), batch["query_mask"])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if self.shots == 1:  # batched: its 1-shot path keeps the episodes apart
            return self.episode_logits(batch)
        episodes = [{k: v[b : b + 1] for k, v in batch.items() if isinstance(v, Tensor)}
                    for b in range(batch["query_image"].shape[0])]  # fmt: skip
        return torch.cat([self.episode_logits(episode) for episode in episodes])


def dropout_off(model: nn.Module) -> None:
    """Every dropout module of ``model`` in eval mode (the training forward made deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


OFFICIAL = {
    "pfenet": OfficialPFENet, "asgnet": OfficialASGNet, "hsnet": OfficialHSNet,
    "bam": OfficialBAM, "dcama": OfficialDCAMA,
}  # fmt: skip


def project_model(
    method: str, checkpoint: Path, mode: Mode, size: int, device: torch.device, shots: int = 1
) -> FewShotSegmentation:
    """The project's model from the official file (``--model.official_checkpoint``) under the
    paper's config, in ``mode``; BAM's with fold 0's base-class channels (what the task's
    ``setup`` reads from the datamodule)."""
    recipe = RECIPES[method]
    head: Callable[..., nn.Module] = recipe.head
    if method == "pfenet":
        head = partial(PFENetHead, bins=pyramid_bins(size))
    elif method == "asgnet":
        head = partial(ASGNetHead, bins=pyramid_bins(size), superpixel_area=superpixel_area(size))
    elif method == "bam":
        head = partial(BAMHead, shots=shots, kshot_trans_dim=2)
    model = FewShotSegmentation(
        head=head,
        official_checkpoint=str(checkpoint),
        channels_last=mode.channels_last,
        compile=mode.compile,
        **recipe.project,
    )
    if recipe.batch_norm_statistics:
        model.backbone_norm = "batch"  # the pfenet/asgnet protocols' backbone_norm
    if method == "bam":
        model.head.base_channel_of = base_channel_lookup(
            list(FOLD0_BASE), PASCAL_CLASSES, len(FOLD0_BASE)
        )
    return model.to(device)


def project_optimizer(model: FewShotSegmentation) -> torch.optim.Optimizer:
    """The task's own ``configure_optimizers`` (parameter groups, SGD or AdamW)."""
    model.trainer = SimpleNamespace(estimated_stepping_batches=1000)  # type: ignore[assignment]
    try:
        return model.configure_optimizers()["optimizer"]
    finally:
        model.trainer = None  # type: ignore[assignment]


def project_eval(model: FewShotSegmentation, batch: dict[str, Any], bf16: bool) -> Tensor:
    """Predicted masks at the input size, as the official forward gives them."""
    return project_logits(model, batch, bf16)[1]


def project_logits(
    model: FewShotSegmentation, batch: dict[str, Any], bf16: bool
) -> tuple[Tensor, Tensor]:
    """Eval logits at the input size ([B, K, 2, H, W] for per-shot heads) and predictions
    (HSNet's vote over the shots)."""
    model.eval()
    size = batch["query_image"].shape[-2:]
    device_type = batch["query_image"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = scored_logits(model.segment(batch))
    if logits.ndim == 5:
        shots = torch.stack([upsample(s.float(), size) for s in logits.unbind(1)], 1)
        return shots, vote(shots.argmax(2))
    logits = upsample(logits.float(), size)
    return logits, logits.argmax(1)


def relative_difference(ours: Tensor, official: Tensor) -> float:
    """Largest absolute difference over the official logits' largest magnitude."""
    if ours.shape != official.shape:
        raise ValueError(f"logits of shape {tuple(ours.shape)} against {tuple(official.shape)}")
    return ((ours - official).abs().max() / official.abs().max().clamp(min=1e-12)).item()


def benchmark(
    args: argparse.Namespace, method: str, shots: int, device: torch.device
) -> list[list[str]]:
    """The rows of one method and shot count: fp32 and the project's fast mode."""
    recipe = RECIPES[method]
    size, batch_size = args.size or recipe.size, args.batch or recipe.batch
    if method in ("pfenet", "asgnet", "bam") and (size - 1) % 8:
        raise SystemExit(f"--size {size}: {method}'s forward needs (size - 1) % 8 == 0")
    checkout = official_checkout(args.official_root, method)
    torch.manual_seed(0)
    official = OFFICIAL[method](checkout, shots, size, device)
    fast = "bf16+cl+compile" if device.type == "cuda" else "bf16+cl"
    modes = {"fp32": MODES["fp32"], fast: MODES[fast]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "official.pth"
        torch.save(official.state_dict(), path)
        models = {
            name: project_model(method, path, mode, size, device, shots)
            for name, mode in modes.items()
        }
    batch = synthetic_batch(batch_size, shots, size, device)
    official.prepare(batch)
    train_batch = official.training_batch(batch)

    with exact_float32():
        reference = official.logits(batch)
        differences = {
            name: relative_difference(project_logits(model, batch, modes[name].bf16)[0], reference)
            for name, model in models.items()
        }
    predicted = official.eval(batch)
    agreement = {
        name: (project_eval(model, batch, modes[name].bf16) == predicted).float().mean().item()
        for name, model in models.items()
    }
    if differences["fp32"] > args.tolerance:
        raise AssertionError(
            f"{method} {shots}-shot: fp32 eval logits differ from the official model's by "
            f"{differences['fp32']:.2e} of their largest magnitude (> --tolerance "
            f"{args.tolerance:g}); the timings would not compare the same computation"
        )
    if isinstance(official, OfficialBAM):
        with exact_float32():
            check_training_losses(official, models["fp32"], train_batch, args.tolerance)

    optimizers = {name: project_optimizer(model) for name, model in models.items()}
    trains: dict[str, Callable[[], object]] = {"official": partial(official.train, train_batch)}
    evals: dict[str, Callable[[], object]] = {"official": partial(official.eval, batch)}
    for name, model in models.items():
        trains[name] = partial(train_step, model, optimizers[name], train_batch, modes[name].bf16)
        evals[name] = partial(project_eval, model, batch, modes[name].bf16)
    train_s = time_alternating(trains, args.steps, args.warmup, device)
    eval_s = time_alternating(evals, args.steps, args.warmup, device)
    memory = {
        "official": peak_step_memory(official.model, official.optimizer, trains["official"], device)
    }
    for name, model in models.items():
        memory[name] = peak_step_memory(model, optimizers[name], trains[name], device)
    if args.profile:
        for name in trains:
            profile(f"{method} {shots}-shot train, {name}", trains[name], device, args.profile)

    rows = []
    for name in models:
        rows.append([
            method, shots, f"{size} px, batch {batch_size}", name,
            f"{batch_size / train_s['official']:.2f}", f"{batch_size / train_s[name]:.2f}",
            f"{train_s['official'] / train_s[name]:.2f}x",
            f"{batch_size / eval_s['official']:.2f}", f"{batch_size / eval_s[name]:.2f}",
            f"{eval_s['official'] / eval_s[name]:.2f}x",
            memory["official"], memory[name], f"{differences[name]:.1e}",
            f"{100 * agreement[name]:.2f}%",
        ])  # fmt: skip
    return rows


def check_training_losses(
    official: OfficialBAM, model: FewShotSegmentation, batch: dict[str, Any], tolerance: float
) -> None:
    """BAM's training forward (the base learner's map without each episode's class) against the
    project's, dropout off on both sides: main and meta-learner losses within ``tolerance``
    (relative). The synthetic episodes label the same number of pixels each, so the project's
    episode mean of the cross-entropy is BAM's pixel mean."""
    main, meta = official.training_losses(batch)
    model.train()
    dropout_off(model)
    with torch.no_grad():
        total, ours, _ = model.loss(model.segment(batch), batch["query_mask"])
    model.train()
    pairs = {"main": (ours, main), "meta": (total - ours, meta)}
    for name, (project, reference) in pairs.items():
        difference = ((project - reference).abs() / reference.abs().clamp(min=1e-12)).item()
        print(
            f"# bam {official.shots}-shot training {name} loss (dropout off): official "
            f"{reference.item():.6f}, project {project.item():.6f}, rel. diff {difference:.1e}",
            flush=True,
        )
        if difference > tolerance:
            raise AssertionError(
                f"bam {official.shots}-shot: the training {name} loss differs from the official "
                f"model's by {difference:.2e} (> --tolerance {tolerance:g})"
            )


def profile(title: str, step: Callable[[], object], device: torch.device, rows: int) -> None:
    """The ops of one call, by self time (``torch.profiler``), printed under ``title``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {title}\n", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


HEADER = [
    "method", "shots", "input", "project mode", "official train ep/s", "project train ep/s",
    "train ratio", "official eval ep/s", "project eval ep/s", "eval ratio",
    "official peak train GiB", "project peak train GiB", "eval logits rel. diff",
    "same prediction",
]  # fmt: skip


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official-root",
        type=Path,
        required=True,
        help="a checkout of the method's repository, or a folder holding checkouts named "
        "PFENet, ASGNet, hsnet, BAM, DCAMA",
    )
    parser.add_argument(
        "--method",
        nargs="+",
        choices=list(RECIPES),
        default=None,
        help="default: every method whose checkout --official-root holds",
    )
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument(
        "--size", type=int, default=None, help="input side (default: the paper's, 473 or 400)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="episodes per batch (default: the paper's)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (compilation)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest fp32 eval logit difference (TF32 off), relative to the official logits' "
        "largest magnitude (default 1e-4 on CPU, 1e-3 on CUDA)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="print this many ops of one profiled step"
    )
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.tolerance is None:
        args.tolerance = 1e-3 if args.device.startswith("cuda") else 1e-4
    if args.method is None:
        args.method = [m for m in RECIPES if has_checkout(args.official_root, m)]
        if not args.method:
            raise OfficialCodeMissing(
                f"--official-root {str(args.official_root)!r} holds no checkout of "
                f"{', '.join(r.repo for r in RECIPES.values())}; fetch them with git clone "
                f"https://github.com/<owner>/<name> {args.official_root / '<name>'}"
            )
    for method in args.method:
        official_checkout(args.official_root, method)  # fail before any model is built
    return args


def has_checkout(root: Path, method: str) -> bool:
    try:
        official_checkout(root, method)
    except OfficialCodeMissing:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    device = setup_device(args)
    print(
        f"# {describe(device)}; {args.steps} timed calls per side after {args.warmup}, "
        "alternating; ratio = official time / project time (> 1: the project is faster)"
    )
    print(markdown_table(HEADER), flush=True)
    for method in args.method:
        for shots in args.shots:
            for row in benchmark(args, method, shots, device):
                print(markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
