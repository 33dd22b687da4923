"""Training equals the papers' own ``train.py``, step for step.

Each method family's paper config runs through the project's real ``fit`` command
(``tasks.segment.main(["fit", "--config", "configs/segment/<preset>.yaml",
"--model.official_checkpoint", FILE, ...])``, a run of ``--trainer.max_steps 8`` that
:class:`Recorder` stops after 4 optimizer steps) beside a transcription of the paper's training
loop on its reference model (written from the official model code in ``test_pfenet``,
``test_bam`` and ``test_hsnet``), from the same weights, on the batches the project's loader gave:

* the optimizer over the official param groups (PFENet ``train.py``, BAM ``get_optim``, ASGNet
  ``_optimizer``: SGD, momentum 0.9, weight decay 1e-4; HSNet: ``Adam(model.parameters())`` at
  1e-3, no schedule);
* ``poly_learning_rate`` (``util/util.py``) before each iteration with ``curr_iter = i + 1`` of
  ``max_iter = 8``, ``index_split=-1``: every group at ``scale_lr`` 10 x ``base_lr``;
* the mode setting: ``model.train()`` (PFENet, ASGNet: the frozen backbone's BatchNorm on batch
  statistics), then BAM's ``fix_bn``, or HSNet's ``train_mode`` (backbone in eval);
* the loss: ``nn.CrossEntropyLoss(ignore_index=255)``, a mean over the batch's labelled pixels
  (HSNet: over all pixels, its boundary already background), plus the auxiliary terms.

Dropout is off on both sides (its masks are random draws); the modules' modes are compared
instead. After every step: each param group's learning rate, each loss term, every gradient and
every tensor of the model (frozen ones and BatchNorm statistics included). The episodes label
different numbers of pixels (rotation and crop padding), so the loss reduction is under test.
ASGNet's official model is not transcribed here (its forward is compared with the official code
by ``benchmarks/vs_official.py``): its loop runs on a copy of the project's model, which tests
the recipe (groups, rates, schedule, modes, loss) the fit applies to it.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures_data import write_pascal_tree
from fixtures_models import randomise_norms
from lightning.pytorch import Callback, LightningModule, Trainer
from reference_dcama import build_reference_dcama, disable_dropout, official_optimizer
from test_bam import ReferenceBAM
from test_hsnet import ReferenceHSNet
from test_pfenet import IMAGE, ReferencePFENet, interp
from test_semantic import ReferencePSPNet
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from backbones import ResNet
from datamodules.episode import to_model_inputs
from tasks import segment
from tasks.heads import ASGNetHead, BAMHead, PFENetHead
from tasks.segment import FewShotSegmentation

STEPS, TOTAL = 4, 8
CONFIGS = Path(__file__).parents[1] / "configs" / "segment"
#: PFENet's bins at 65 px (9 x 9 features; the paper's 60/30/15/8 are for 60 x 60)
BINS = [9, 5, 3, 2]
#: PASCAL-5i fold 0's base classes (0-based): BAM's ``sub_list``, whose index is ``cat_idx``
FOLD0_BASE = list(range(5, 20))

# --- the official training loop, transcribed -------------------------------------------------


def poly_learning_rate(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    curr_iter: int,
    max_iter: int,
    power: float = 0.9,
    index_split: int = -1,
    scale_lr: float = 10.0,
) -> None:
    """``util/util.py`` of PFENet, ASGNet and BAM (warm-up off in every config)."""
    lr = base_lr * (1 - float(curr_iter) / max_iter) ** power
    for index, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr if index <= index_split else lr * scale_lr


def fix_bn(m: nn.Module) -> None:
    """BAM's ``util/util.py``."""
    if m.__class__.__name__.find("BatchNorm") != -1:
        m.eval()


def official_sgd(model: nn.Module, groups: tuple[str, ...], base_lr: float) -> torch.optim.SGD:
    """``torch.optim.SGD([{'params': model.<group>.parameters()}, ...], lr=base_lr, momentum=0.9,
    weight_decay=0.0001)``, the groups in the official order."""
    params = [{"params": getattr(model, name).parameters()} for name in groups]
    return torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=1e-4)


#: PFENet ``train.py`` L114-125
PFENET_GROUPS = ("down_query", "down_supp", "init_merge", "alpha_conv", "beta_conv",
                 "inner_cls", "res1", "res2", "cls")  # fmt: skip
#: ASGNet ``model/asgnet.py`` ``_optimizer`` (``pyramid: True``)
ASGNET_GROUPS = ("down_conv", "corr_conv", "alpha_conv", "beta_conv", "inner_cls", "res1",
                 "res2", "cls")  # fmt: skip
#: BAM ``model/BAM.py`` ``get_optim`` (``kshot_rw`` last for K > 1)
BAM_GROUPS = ("down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta",
              "cls_meta", "gram_merge", "cls_merge")  # fmt: skip


@dataclass
class Step:
    """What one optimizer step did: each group's lr, the loss terms, the gradients, the state."""

    lrs: list[float]
    losses: dict[str, float]
    grads: dict[str, Tensor]
    state: dict[str, Tensor]


def official_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, Tensor]],
    losses: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]],
    base_lr: float | None,
) -> list[Step]:
    """The body of ``train.py``'s ``train()``: lr set (``base_lr`` given), forward and loss,
    ``zero_grad``, ``backward``, ``step``, for each batch."""
    steps = []
    for i, batch in enumerate(batches):
        if base_lr is not None:
            poly_learning_rate(optimizer, base_lr, i + 1, TOTAL)
        terms = losses(model, batch)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        steps.append(Step([g["lr"] for g in optimizer.param_groups],
                          {k: v.item() for k, v in terms.items() if k != "total"}, grads,
                          {k: v.clone() for k, v in model.state_dict().items()}))  # fmt: skip
    return steps


def official_inputs(batch: dict[str, Tensor], model: nn.Module) -> tuple[Tensor, ...]:
    """``x, s_x, s_y, y`` of the official loaders from the project's batch (the same pixels), in
    the model's floating type."""
    dtype = next(model.parameters()).dtype
    inputs = to_model_inputs(batch, dtype)
    return (inputs["query_image"].to(dtype), inputs["support_images"].to(dtype),
            inputs["support_masks"], inputs["query_mask"])  # fmt: skip


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``nn.CrossEntropyLoss(ignore_index=255)``."""
    return F.cross_entropy(logits, target, ignore_index=255)


def pfenet_losses(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model/PFENet.py``'s training branch and ``train.py``'s ``main_loss + aux_weight *
    aux_loss``: the inner classifiers' outputs upsampled to the label, CE averaged over them."""
    x, s_x, s_y, y = official_inputs(batch, model)
    out, out_list = model(x, s_x, s_y)
    main = cross_entropy(out, y)
    aux = sum(cross_entropy(interp(o, y.shape[-2:]), y) for o in out_list) / len(out_list)
    return {"main_loss": main, "aux_loss": aux, "total": main + 1.0 * aux}


def bam_losses(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model/BAM.py``'s training branch: ``main_loss`` of the final output, ``aux_loss1`` of
    the meta learner's (``train.py``: ``aux_weight1`` 1.0); ``aux_loss2``, the base learner's,
    reaches no trainable parameter and needs base-class labels, so it is left out."""
    x, s_x, s_y, y = official_inputs(batch, model)
    cat_idx = [torch.tensor([FOLD0_BASE.index(c) for c in batch["class_id"].tolist()])]
    final, meta, _ = model(x, s_x, s_y, cat_idx)
    main, aux = cross_entropy(final, y), cross_entropy(meta, y)
    return {"main_loss": main, "aux_loss": aux, "total": main + 1.0 * aux}


def hsnet_losses(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model/hsnet.py``'s ``compute_objective``: ``nn.CrossEntropyLoss()`` over every pixel."""
    x, s_x, s_y, y = official_inputs(batch, model)
    logit_mask = model(x, s_x[:, 0], s_y[:, 0])
    bsz = logit_mask.size(0)
    loss = nn.CrossEntropyLoss()(logit_mask.view(bsz, 2, -1), y.view(bsz, -1).long())
    return {"main_loss": loss, "total": loss}


def asgnet_losses(model: FewShotSegmentation, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model/asgnet.py``'s training branch (``main_loss``, the mean of the inner classifiers'
    CE) on the project's model."""
    x, s_x, s_y, y = official_inputs(batch, model)
    output = model(x, s_x, s_y)
    main = cross_entropy(interp(output.logits, y.shape[-2:]), y)
    aux = sum(cross_entropy(interp(o, y.shape[-2:]), y) for o in output.aux_logits)
    aux = aux / len(output.aux_logits)
    return {"main_loss": main, "aux_loss": aux, "total": main + 1.0 * aux}


# --- the project's fit, recorded ---------------------------------------------------------------


def dropout_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _DropoutNd):
            module.p = 0.0


def modes(model: nn.Module) -> Counter[tuple[str, bool]]:
    """How many BatchNorm and dropout modules are in train and in eval mode."""
    return Counter(
        ("dropout" if isinstance(m, _DropoutNd) else "batchnorm", m.training)
        for m in model.modules()
        if isinstance(m, _BatchNorm | _DropoutNd)
    )


class Recorder(Callback):
    """Each optimizer step of the fit (one batch per step): its batch, its groups' learning
    rates, the logged loss terms, the gradients and the state after it; stops the fit after
    :data:`STEPS` steps. Dropout off from the start; the modules' modes in the first step."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Tensor]] = []
        self.lrs: list[list[float]] = []
        self.losses: list[dict[str, float]] = []
        self.grads: list[dict[str, Tensor]] = []
        self.states: list[dict[str, Tensor]] = []
        self.modes: Counter[tuple[str, bool]] | None = None
        self.initial: dict[str, Tensor] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dropout_off(pl_module)
        self.initial = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.states:
            self._record_losses(trainer)
        self.modes = self.modes or modes(pl_module)
        self.batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, Tensor)})
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        named = pl_module.named_parameters()
        self.grads.append({k: p.grad.clone() for k, p in named if p.grad is not None})
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        trainer.should_stop = len(self.states) >= STEPS

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record_losses(trainer)

    def _record_losses(self, trainer: Trainer) -> None:
        """The terms the last step logged (Lightning files them after ``on_train_batch_end``)."""
        metrics = trainer.callback_metrics
        names = [n for n in ("main_loss", "aux_loss") if f"train/{n}" in metrics]
        self.losses.append({name: metrics[f"train/{name}"].item() for name in names})


def project_fit(config: str, root: Path, tmp_path: Path, *extra: str) -> Recorder:
    """``python -m tasks.segment fit --config configs/segment/<config>.yaml`` on the test tree,
    8 steps announced, 4 run (:class:`Recorder`); the data at 65 px, one device batch per
    optimizer step (``extra``: the weights, the batch)."""
    cli = segment.main([
        "fit", "--config", str(CONFIGS / f"{config}.yaml"),
        "--data.root", str(root), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.image_size", str(IMAGE), "--data.num_workers", "0", "--data.val_fraction", "0.2",
        "--data.train_list", "ImageSets/SegmentationAug/train_aug.txt",  # the tree's list
        "--trainer.max_steps", str(TOTAL), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks+=test_training_parity.Recorder", *extra,
    ])  # fmt: skip
    (recorder,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Recorder"]
    assert len(recorder.states) == STEPS and cli.trainer.global_step == STEPS
    assert cli.trainer.accumulate_grad_batches == 1
    return recorder


# --- comparisons -----------------------------------------------------------------------------


def relative(got: Tensor, want: Tensor) -> float:
    """Largest difference over the reference tensor's largest magnitude."""
    scale = want.double().abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


def key_map(build: Callable[[dict[str, Tensor]], FewShotSegmentation],
            state: dict[str, Tensor]) -> dict[str, str]:  # fmt: skip
    """The project's state-dict key of each official key, as the project's own loader maps them
    (``official_checkpoint``): every official tensor filled with its index, loaded, read back."""
    keys = list(state)
    tagged = {k: torch.full_like(v, i) for i, (k, v) in enumerate(state.items())}
    mapping = {}
    for name, value in build(tagged).state_dict().items():
        index = int(value.flatten()[0].item())
        assert (value == index).all(), name
        mapping[name] = keys[index]
    return mapping


def official_runs(
    reference: nn.Module,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: list[dict[str, Tensor]],
    losses: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]],
    base_lr: float | None,
) -> tuple[list[Step], list[dict[str, float]]]:
    """The official loop on a copy of ``reference`` (modes as set) in float32, and the float32
    rounding floor of each step's gradients and tensors: their error against the same loop in
    float64, per official key."""
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(reference).to(dtype)
        runs[dtype] = official_training(model, optimizer(model), batches, losses, base_lr)
    floors = [
        {f"grad:{k}": relative(v, exact.grads[k]) for k, v in step.grads.items()}
        | {f"state:{k}": relative(v, exact.state[k]) for k, v in step.state.items()}
        for step, exact in zip(runs[torch.float32], runs[torch.float64], strict=True)
    ]
    return runs[torch.float32], floors


def assert_same_steps(
    recorder: Recorder,
    official: list[Step],
    floors: list[dict[str, float]],
    mapping: dict[str, str],
    tolerance: float = 1e-5,
) -> None:
    """Each step's learning rates (ratio to 1e-6), loss terms (to ``tolerance`` relative) and
    every gradient and tensor (to ``tolerance`` of its largest magnitude, or 4 times the
    official code's own float32 error where that is larger: PFENet's BatchNorm on batch
    statistics of random-weight features amplifies rounding; BAM's K-shot weights get
    gradients of a few 1e-6)."""
    worst: dict[str, float] = {"lr": 0.0, "loss": 0.0, "grad": 0.0, "state": 0.0}
    for step, (theirs, lrs, losses, grads, state) in enumerate(
        zip(official, recorder.lrs, recorder.losses, recorder.grads, recorder.states, strict=True)
    ):
        for lr in lrs:
            for official_lr in theirs.lrs:
                worst["lr"] = max(worst["lr"], abs(lr / official_lr - 1))
                assert abs(lr / official_lr - 1) <= 1e-6, (step, lrs, theirs.lrs)
        assert losses.keys() == theirs.losses.keys(), (losses, theirs.losses)
        for name, value in losses.items():
            error = abs(value - theirs.losses[name]) / abs(theirs.losses[name])
            worst["loss"] = max(worst["loss"], error)
            assert error <= tolerance, (step, name, value, theirs.losses[name])
        assert {mapping[k] for k in grads} == set(theirs.grads), step
        for kind, ours, reference in (
            ("grad", grads, theirs.grads),
            ("state", state, theirs.state),
        ):
            for key, value in ours.items():
                error = relative(value, reference[mapping[key]])
                worst[kind] = max(worst[kind], error)
                bound = max(tolerance, 4 * floors[step][f"{kind}:{mapping[key]}"])
                assert error <= bound, (step, kind, key, error, bound)
    floor = {kind: max(v for k, v in floors[-1].items() if k.startswith(kind))
             for kind in ("grad", "state")}  # fmt: skip
    print(f"worst relative errors over {len(official)} steps: {worst}; official float32 floor "
          f"at the last step: {floor}")  # fmt: skip


def assert_training_moved(
    official: list[Step], first: dict[str, Tensor], trained: set[str]
) -> None:
    """The trained tensors moved by far more than the tolerance: the comparison has teeth."""
    moved = max(relative(official[-1].state[k], first[k]) for k in trained)
    assert moved > 100 * 1e-5, moved


def assert_unequal_labelled_pixels(batches: list[dict[str, Tensor]]) -> None:
    """Some batch's episodes label different numbers of pixels: a per-episode mean would differ
    from the papers' pixel mean there."""
    counts = [(b["query_mask"] != 255).flatten(1).sum(1) for b in batches]
    assert any(len(set(c.tolist())) > 1 for c in counts), counts


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PASCAL tree with every class in 40 training images: enough for 5-shot episodes of the
    held-out validation split of BAM's training list (novel-class images dropped)."""
    return write_pascal_tree(tmp_path_factory.mktemp("voc") / "VOC2012", num_train=800)


def save_official(state: dict[str, Tensor], path: Path, wrapped: bool = True) -> Path:
    """As the official ``train.py`` saves (``{'epoch', 'state_dict', 'optimizer'}``, DataParallel's
    ``module.``; HSNet: the bare ``module.`` state dict)."""
    state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 1, "state_dict": state, "optimizer": {}} if wrapped else state, path)
    return path


def official_builder(tmp_path: Path, wrapped: bool = True, **head: Any):
    """An official state dict -> the project's model built from it (``official_checkpoint``)."""

    def build(state: dict[str, Tensor]) -> FewShotSegmentation:
        path = save_official(state, tmp_path / "tagged.pth", wrapped)
        return FewShotSegmentation(official_checkpoint=str(path), **head)

    return build


def frozen(model: nn.Module, *names: str) -> None:
    """PFENet's ``param.requires_grad = False`` loop, BAM's ``freeze_modules``."""
    for name in names:
        getattr(model, name).requires_grad_(False)


ENCODER = ("layer0", "layer1", "layer2", "layer3", "layer4")


@pytest.mark.slow
def test_pfenet_trains_as_its_train_py(voc: Path, tmp_path: Path) -> None:
    """``configs/segment/pfenet_pascal.yaml`` (SGD at 10 x 0.0025, the frozen backbone's
    BatchNorm on batch statistics, query and each shot in their own calls) against PFENet's
    loop; the official code's float32 error, measured against its own float64 run, bounds the
    project's (BatchNorm on batch statistics of random-weight features amplifies rounding)."""
    torch.manual_seed(0)
    reference = ReferencePFENet(BINS, 1)
    randomise_norms(reference)
    frozen(reference, *ENCODER)
    first = {k: v.clone() for k, v in reference.state_dict().items()}
    checkpoint = save_official(first, tmp_path / "train_epoch_200.pth")
    recorder = project_fit("pfenet_pascal", voc, tmp_path, "--model.official_checkpoint",
                           str(checkpoint), "--model.head.init_args.bins", str(BINS))  # fmt: skip
    assert_unequal_labelled_pixels(recorder.batches)
    reference.train()
    dropout_off(reference)
    assert modes(reference) == recorder.modes
    optimizer = partial(official_sgd, groups=PFENET_GROUPS, base_lr=0.0025)
    official, floors = official_runs(reference, optimizer, recorder.batches, pfenet_losses, 0.0025)
    build = official_builder(tmp_path, head=partial(PFENetHead, bins=BINS))
    assert_same_steps(recorder, official, floors, key_map(build, first))
    assert_training_moved(official, first, set(official[0].grads))


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5])
def test_bam_trains_as_its_train_py(shots: int, voc: Path, tmp_path: Path) -> None:
    """``configs/segment/bam_pascal.yaml`` (SGD at 10 x 0.005 over ``get_optim``'s groups, the
    frozen encoder and base learner with BatchNorm in eval, the base learner's dropout active,
    the K-shot weights learning from the prior too) against BAM's loop, 1 and 5 shots."""
    torch.manual_seed(0)
    reference = ReferenceBAM(ReferencePSPNet(16), shots)
    randomise_norms(reference)
    with torch.no_grad():  # off their (1, 0) start, so that both inputs of each merge count
        reference.gram_merge.weight.copy_(torch.tensor([0.8, 0.3]).view(1, 2, 1, 1))
        reference.cls_merge.weight.copy_(torch.tensor([0.7, 0.4]).view(1, 2, 1, 1))
    frozen(reference, *ENCODER, "learner_base")
    first = {k: v.clone() for k, v in reference.state_dict().items()}
    checkpoint = save_official(first, tmp_path / "train_epoch_200.pth")
    recorder = project_fit("bam_pascal", voc, tmp_path, "--model.official_checkpoint",
                           str(checkpoint), "--model.head.init_args.shots", str(shots),
                           "--data.shots", str(shots), "--data.batch_size", "8")  # fmt: skip
    assert_unequal_labelled_pixels(recorder.batches)
    reference.train()
    reference.apply(fix_bn)
    dropout_off(reference)
    assert modes(reference) == recorder.modes and modes(reference)["dropout", True] == 4
    groups = BAM_GROUPS + (("kshot_rw",) if shots > 1 else ())
    optimizer = partial(official_sgd, groups=groups, base_lr=0.005)
    official, floors = official_runs(reference, optimizer, recorder.batches, bam_losses, 0.005)
    build = official_builder(tmp_path, head=partial(BAMHead, shots=shots))
    mapping = key_map(build, first)
    assert_same_steps(recorder, official, floors, mapping)
    first_step = {
        k: relative(v, official[0].grads[mapping[k]]) for k, v in recorder.grads[0].items()
    }
    assert max(first_step.values()) <= 1e-5, first_step  # ``kshot_rw`` included for K > 1
    assert_training_moved(official, first, set(official[0].grads))


@pytest.mark.slow
def test_hsnet_trains_as_its_train_py(voc: Path, tmp_path: Path) -> None:
    """``configs/segment/hsnet_pascal.yaml`` (Adam at 1e-3, constant; backbone in eval; boundary
    pixels as background, every pixel in the loss) against HSNet's loop (``train_mode``, Adam
    over ``model.parameters()``, ``compute_objective``), at 160 px and a global batch of 4
    instead of 400 px and 20."""
    torch.manual_seed(0)
    reference = ReferenceHSNet()
    randomise_norms(reference)
    first = {k: v.clone() for k, v in reference.state_dict().items()}
    checkpoint = save_official(first, tmp_path / "best_model.pt", wrapped=False)
    recorder = project_fit("hsnet_pascal", voc, tmp_path, "--model.official_checkpoint",
                           str(checkpoint), "--data.image_size", "160",
                           "--data.global_batch_size", "4")  # fmt: skip
    assert all((b["query_mask"] != 255).all() for b in recorder.batches)
    reference.train()
    reference.backbone.eval()  # ``train_mode``
    assert modes(reference) == recorder.modes

    def adam(model: nn.Module) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}])

    official, floors = official_runs(reference, adam, recorder.batches, hsnet_losses, None)
    build = official_builder(tmp_path, wrapped=False)
    assert_same_steps(recorder, official, floors, key_map(build, first))
    assert_training_moved(official, first, set(official[0].grads))


def dcama_losses(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``train.py``'s 1-shot forward and ``compute_objective``: ``nn.CrossEntropyLoss()`` over
    every pixel."""
    x, s_x, s_y, y = official_inputs(batch, model)
    loss = model.compute_objective(model(x, s_x[:, 0], s_y[:, 0]), y)
    return {"main_loss": loss, "total": loss}


@pytest.mark.slow
def test_dcama_trains_as_its_train_py(voc: Path, tmp_path: Path) -> None:
    """``configs/segment/dcama_pascal.yaml`` (SGD with Nesterov momentum at 1e-3, constant,
    weight decay 1e-4; encoder in eval; boundary pixels as background, every pixel in the loss)
    from a released ``best_model.pt`` against DCAMA's loop (``train_mode``, ``SGD`` over
    ``model.parameters()``, ``compute_objective``), at 128 px and a global batch of 4 instead
    of 384 px and 48. Both in float64: on random weights the attention at 1/8 is nearly
    uniform and ``conv3``'s ReLU gates sit within float32 rounding of zero, so the official
    code's own float32 gradients of ``conv3`` move by 1e-3 when its input moves by 1e-7
    (measured); the float64 runs have no such gates."""
    torch.manual_seed(0)
    reference = build_reference_dcama("resnet50")
    randomise_norms(reference)
    first = {k: v.clone() for k, v in reference.state_dict().items()}
    checkpoint = save_official(first, tmp_path / "best_model.pt", wrapped=False)
    recorder = project_fit("dcama_pascal", voc, tmp_path, "--model.official_checkpoint",
                           str(checkpoint), "--data.image_size", "128",
                           "--data.global_batch_size", "4",
                           "--trainer.precision", "64-true")  # fmt: skip
    assert all((b["query_mask"] != 255).all() for b in recorder.batches)
    reference.train_mode()
    disable_dropout(reference)
    assert modes(reference) == recorder.modes
    model = copy.deepcopy(reference).double()
    official = official_training(model, official_optimizer(model), recorder.batches,
                                 dcama_losses, None)  # fmt: skip
    # float64: the tolerance alone; but the keys' bias has no gradient in exact arithmetic (a
    # constant added to all of a query's scores leaves the softmax), only rounding, on both sides
    zero = [k for k in official[0].grads if k.endswith("linears.1.bias")]
    floors = [defaultdict(float, {f"grad:{k}": math.inf for k in zero}) for _ in official]
    for step in (*official, *recorder.grads):
        grads = step.grads if isinstance(step, Step) else step
        assert all(grads[k].abs().max() < 1e-12 for k in grads if k.endswith("linears.1.bias"))
    build = official_builder(tmp_path, wrapped=False)
    assert_same_steps(recorder, official, floors, key_map(build, first))
    assert_training_moved(official, first, set(official[0].grads))


@pytest.mark.slow
def test_asgnet_trains_as_its_train_py(voc: Path, tmp_path: Path) -> None:
    """``configs/segment/pascal.yaml`` (SGD at 10 x 0.0025 over ``_optimizer``'s groups, the
    frozen backbone's BatchNorm on batch statistics) against ASGNet's loop run on the project's
    model at the fit's first weights (its forward is the official one, ``benchmarks/
    vs_official.py``)."""
    encoder = ResNet("resnet50", stem="deep", output_stride=8, dilation_scheme="uniform")
    randomise_norms(encoder)
    weights = tmp_path / "resnet50_v2.pth"  # hszhao/semseg's layout
    torch.save({k.removeprefix("stem."): v for k, v in encoder.state_dict().items()}, weights)
    recorder = project_fit("pascal", voc, tmp_path,
                           "--model.backbone.init_args.weights", str(weights))  # fmt: skip
    assert_unequal_labelled_pixels(recorder.batches)
    model = FewShotSegmentation(copy.deepcopy(encoder), ASGNetHead, freeze_backbone=True)
    model.load_state_dict(recorder.initial)
    model.backbone_norm = "batch"  # query and each shot in their own backbone calls
    nn.Module.train(model)  # ``model.train()``: every module, the backbone's BatchNorm too
    dropout_off(model)
    assert modes(model) == recorder.modes

    def sgd(model: FewShotSegmentation) -> torch.optim.SGD:
        return official_sgd(model.head, ASGNET_GROUPS, 0.0025)

    official, floors = official_runs(model, sgd, recorder.batches, asgnet_losses, 0.0025)
    identity = {k: k for k in model.state_dict()}
    assert_same_steps(recorder, official, floors, identity)
    assert_training_moved(official, recorder.initial, set(official[0].grads))


# --- the README's recipe table is the configs' -----------------------------------------------

README = Path(__file__).parents[1] / "README.md"


def recipe_rows() -> list[dict[str, str]]:
    """The rows of README.md's "Training recipes" table, "as `<config>`" cells resolved."""
    section = README.read_text().split("## Training recipes", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows: list[dict[str, str]] = []
    for line in lines[2:]:
        row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for column, cell in row.items():
            if cell.startswith("as `"):  # "as `<config>`": that row's value
                (named,) = [r for r in rows if cell.split("`")[1] in config_names(r)]
                row[column] = named[column]
        rows.append(row)
    return rows


def config_names(row: dict[str, str]) -> list[str]:
    return re.findall(r"`([a-z0-9_]+\.yaml)`", row["config"])


def first_number(cell: str) -> float:
    return float(re.match(r"[0-9.]+(?:e-?[0-9]+)?", cell).group())


def test_readme_recipe_table_is_what_each_config_sets() -> None:
    """Every paper config appears in the table once, and its optimizer, learning rate, schedule,
    epochs and global batch are the table's; its header states the learning rate."""
    rows = recipe_rows()
    named = {
        name: row for row in rows for name in re.findall(r"`([a-z0-9_]+\.yaml)`", row["config"])
    }
    papers = {p.name for p in CONFIGS.glob("*.yaml")} - {"default.yaml"}
    assert set(named) == papers, (sorted(named), sorted(papers))
    for name, row in named.items():
        text = (CONFIGS / name).read_text()
        config = yaml.safe_load(text)
        model, trainer = config["model"], config["trainer"]
        lr = first_number(row["lr"])
        assert model["lr"] == lr, (name, model["lr"], row["lr"])
        header = "".join(line for line in text.splitlines() if line.startswith("#"))
        assert any(f in header for f in (row["lr"].split()[0], f"{lr:.0e}".replace("e-0", "e-"))), (
            name
        )
        adam = row["optimizer"].startswith("Adam")
        sgd = "nesterov" if "Nesterov" in row["optimizer"] else "sgd"
        assert model.get("optimizer", "sgd") == ("adamw" if adam else sgd), name
        assert model.get("weight_decay", 1e-4) == (0.0 if adam else 1e-4), name
        assert model.get("poly_power", 0.9) == (0.0 if row["schedule"] == "constant" else 0.9)
        assert trainer["max_epochs"] == int(first_number(row["epochs"])), name
        batch = config["data"]["init_args"]["global_batch_size"]
        assert batch == int(first_number(row["global batch"])), name
