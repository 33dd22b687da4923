"""The LightningModule machinery both tasks share: argument checks, self-describing
hyper-parameters, the non-finite loss stop, optimizer and per-step schedule, class names and the
check that a checkpoint fits the model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from backbones.arguments import missing_options
from backbones.protocol import Backbone, class_path
from backbones.weights import state_mismatches

#: ``nesterov``: SGD with Nesterov momentum (DCAMA's ``train.py``).
Optimizer = Literal["sgd", "nesterov", "adamw"]
Schedule = Literal["cosine", "poly"]

#: Lightning's ``load_from_checkpoint`` rebuilds a module whose hyper-parameters name this
#: instantiator through jsonargparse, so the ``class_path`` dicts of the backbone and the head
#: become objects again (the mechanism LightningCLI uses; pinned by tests/test_contracts.py).
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def check_arguments(checks: Iterable[tuple[str, object, bool, str]]) -> None:
    """Raise one ``ValueError`` naming the first ``(name, value, ok, expected)`` that fails."""
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")


def optimizer_checks(optimizer: str, momentum: float) -> list[tuple[str, object, bool, str]]:
    """The :func:`check_arguments` of the ``optimizer`` options: a known one, and a momentum
    for Nesterov's (``torch.optim.SGD`` refuses ``nesterov`` without one, but only when the
    optimizer is built, after setup)."""
    known = get_args(Optimizer)
    return [
        ("optimizer", optimizer, optimizer in known, str(known)),
        ("momentum", momentum, optimizer != "nesterov" or momentum > 0,
         "> 0 with optimizer nesterov"),
    ]  # fmt: skip


def describe_head(head: nn.Module) -> dict[str, Any]:
    """A head's ``class_path`` and ``init_args`` (its options but ``features``, which come
    from the backbone), as a config file names it; a head whose ``init_args`` lack an option of
    its constructor is refused, since its checkpoint would reload that option's default."""
    init_args = dict(getattr(head, "init_args", {}))
    missing = missing_options(head, init_args)
    if missing:
        raise ValueError(
            f"head {class_path(head)} does not record its options {missing} in init_args, so a "
            "checkpoint would rebuild it with their defaults; derive it from "
            "backbones.arguments.CapturesArguments (tasks.heads' heads do), which records them"
        )
    return {"class_path": class_path(head), "init_args": init_args}


def poly_factor(step: int, total: int, power: float) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) of ``total``: ``(1 - (step
    + 1) / total) ** power``, as PFENet, ASGNet and BAM's ``poly_learning_rate`` set it *before*
    each iteration from ``curr_iter = epoch * len(loader) + i + 1`` (``util/util.py``,
    ``train.py``): the first step is already decayed and the last runs at 0. ``power`` 0 is a
    constant rate (HSNet)."""
    return max(0.0, 1.0 - (step + 1) / total) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int, poly_power: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """The papers' poly schedule (:func:`poly_factor`; torch's ``PolynomialLR``, stepped after
    each optimizer step, runs one step behind it) or ``CosineAnnealingLR`` (Loshchilov & Hutter,
    2017) to 0 over ``total_steps``; both stepped after every optimizer step."""
    total = max(1, total_steps)
    if schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(poly_factor, total=total, power=poly_power)
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def upgrade_scheduler_states(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written with torch's ``PolynomialLR`` (before the papers' schedule) resumes
    on :func:`build_scheduler`'s ``LambdaLR``: its state gets the ``lr_lambdas`` entry that
    ``LambdaLR`` reads, and its ``last_epoch`` (the steps done) carries on."""
    for state in checkpoint.get("lr_schedulers") or []:
        if "lr_lambdas" not in state and {"power", "total_iters"} <= set(state):
            state["lr_lambdas"] = [None] * len(state.get("base_lrs", []))


class BaseTask(LightningModule):
    """A task whose checkpoints describe its model.

    Subclasses call :meth:`save_description` after building ``backbone`` (passing a head's
    :func:`describe_head`): the stored hyper-parameters then hold the backbone's and the head's
    ``class_path`` and ``init_args`` (weights files cleared: the checkpoint holds the tensors), so
    ``load_from_checkpoint(path)`` and ``test --ckpt_path path`` need no config.
    """

    backbone: Backbone

    def save_description(self, **resolved: Any) -> None:
        """Record the built models and ``resolved`` arguments in place of what ``__init__``
        was given (objects, defaults resolved at run time, files already read)."""
        self.hparams["backbone"] = self.backbone.describe()
        self.hparams.update(resolved)
        self.hparams["_instantiator"] = INSTANTIATOR

    #: Training steps between the host's reads of the device-side non-finite record (a read
    #: waits for the device to finish); ``finite_check_deferred`` ``None``: deferred on
    #: accelerators, every step read on the CPU, where a read costs nothing.
    finite_check_every: int = 50
    finite_check_deferred: bool | None = None

    def check_finite(self, loss: Tensor) -> None:
        """Stop on a non-finite training loss with its step, its epoch and a hint. On an
        accelerator the first non-finite loss is recorded on the device and read every
        :attr:`finite_check_every` steps, at epoch end and before any checkpoint is written
        (:meth:`raise_if_nonfinite`), so the step never waits on the device for it."""
        deferred = self.finite_check_deferred
        if not (loss.device.type != "cpu" if deferred is None else deferred):
            if not torch.isfinite(loss):
                self._nonfinite_error(loss.item(), self.global_step, self.current_epoch)
            return
        value = loss.detach().double().reshape(())
        record = getattr(self, "_nonfinite", None)
        if record is None or record.device != value.device:
            record = self._nonfinite = torch.full((3,), -1.0, device=value.device).double()
        # fill kernels, not host-to-device copies: nothing here waits for the device
        now = torch.stack([value, value.new_full((), self.global_step),
                           value.new_full((), self.current_epoch)])  # fmt: skip
        first = ~torch.isfinite(value) & (record[1] < 0)
        record.copy_(torch.where(first, now, record))
        if (self.global_step + 1) % self.finite_check_every == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """Raise for the first non-finite loss recorded on the device (a host sync)."""
        record = getattr(self, "_nonfinite", None)
        if record is not None:
            loss, step, epoch = record.tolist()
            if step >= 0:
                self._nonfinite_error(loss, int(step), int(epoch))

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """No checkpoint of weights a non-finite loss has already touched."""
        self.raise_if_nonfinite()

    @staticmethod
    def _nonfinite_error(loss: float, step: int, epoch: int) -> None:
        raise FloatingPointError(
            f"non-finite training loss ({loss}) at global step {step}, epoch {epoch}: lower the "
            "learning rate (model.lr) or check the data"
        )

    def attached_trainer(self) -> Trainer | None:
        """The trainer, or ``None`` for a module used on its own."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def class_names(self) -> list[str]:
        """The datamodule's class names when the module is attached to one, else the indices."""
        names = getattr(getattr(self.attached_trainer(), "datamodule", None), "class_names", None)
        return list(names) if names else [str(i) for i in range(self.hparams.num_classes)]

    def optimization(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], schedule: Schedule
    ) -> dict[str, Any]:
        """``configure_optimizers``'s answer from the ``optimizer``, ``lr``, ``momentum``,
        ``weight_decay`` and ``poly_power`` hyper-parameters, the schedule
        (:func:`build_scheduler`) running to 0 over the run, stepped every batch."""
        hp = self.hparams
        if hp.optimizer in ("sgd", "nesterov"):
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay,
                                        nesterov=hp.optimizer == "nesterov")  # fmt: skip
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, schedule, total, hp.poly_power)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another task or model fails here with one error naming the file,
        before Lightning's strict load lists keys without naming either."""
        upgrade_scheduler_states(checkpoint)
        path = getattr(self.attached_trainer(), "ckpt_path", None)
        source = f"checkpoint {str(path)!r}" if path else "the checkpoint"
        name = type(self).__name__
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{source} holds no state_dict; expected a Lightning checkpoint of {name}"
            )
        problems = state_mismatches(self.state_dict(), state, self.strict_loading, limit=6)
        if problems:
            raise ValueError(
                f"{source} does not fit {name} ({'; '.join(problems)}); expected a checkpoint "
                f"of {name} with the same model settings (a checkpoint of the other task? its "
                "encoder loads as --model.backbone.init_args.weights)"
            )
