"""The data settings that define an experiment, stored in every checkpoint and compared with the
data of the command that reads the checkpoint again.

``fit --ckpt_path`` with another fold, shots or dataset would resume training on another
experiment's classes, and ``test``/``validate`` on another fold scores classes the model trained
on; both are refused before any step, with both values and the option that forces the run
(``--data_mismatch allow``). Differences that leak nothing (test episodes, seeds, workers, batch
size) are allowed, and listed in one line.

:class:`RecordDataSettings` writes :func:`data_settings` into each checkpoint under
:data:`CHECKPOINT_KEY`; :func:`check_data_settings` compares. A checkpoint written before the
settings were recorded is compared on what Lightning stored of the datamodule's arguments
(``datamodule_hyper_parameters``: fold and shots).
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

#: Where :class:`RecordDataSettings` puts the settings in a checkpoint.
CHECKPOINT_KEY = "data_settings"

#: ``--data_mismatch``: refuse a defining difference (the default) or run anyway.
DataMismatch = Literal["error", "allow"]

#: The settings that define an experiment: for each, the option that sets it and the commands
#: on which a difference from the checkpoint's is an error (it would train on another
#: experiment's classes, or score classes the model trained on). A difference elsewhere (shots
#: or the protocol at test: HSNet tests its 1-shot models with 5 shots) is reported, not refused.
DEFINING: dict[str, tuple[str, tuple[str, ...]]] = {
    "dataset": ("--data.dataset (or --data)", ("fit", "validate", "test")),
    "fold": ("--data.fold", ("fit", "validate", "test")),
    "novel_classes": ("the fold's class split", ("fit", "validate", "test")),
    "shots": ("--data.shots", ("fit",)),
    "protocol": ("--data.protocol", ("fit",)),
}

#: Datamodule arguments whose difference is never reported (paths and machine settings).
UNREPORTED = {"root", "cache_dir", "num_workers", "predict_support", "predict_support_masks",
              "predict_queries", "predict_images", "predict_dir"}  # fmt: skip


def data_settings(datamodule: LightningDataModule | None) -> dict[str, Any]:
    """The :data:`DEFINING` settings of a datamodule, resolved (``protocol`` by its preset's
    name, ``novel_classes`` as indices); a setting the datamodule does not have is left out.
    Datamodules without a class split (classification) have none."""
    if datamodule is None or getattr(datamodule, "fold", None) is None:
        return {}
    kind = type(getattr(datamodule, "dataset", datamodule))
    protocol = getattr(datamodule, "protocol", None)
    settings = {
        "dataset": f"{kind.__module__}.{kind.__qualname__}",
        "fold": datamodule.fold,
        "novel_classes": getattr(datamodule, "novel_classes", None),
        "shots": getattr(datamodule, "shots", None),
        "protocol": protocol.get("name") if isinstance(protocol, dict) else protocol,
    }
    return {k: _plain(v) for k, v in settings.items() if v is not None}


def _plain(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, list | tuple) else value


class RecordDataSettings(Callback):
    """Store :func:`data_settings` in every checkpoint (read back by
    :func:`check_data_settings`)."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        settings = data_settings(trainer.datamodule)
        if settings:
            checkpoint[CHECKPOINT_KEY] = settings


def dataset_path(path: str) -> str:
    """A stored ``dataset`` setting as the dataset's class path: checkpoints written before
    datasets were classes of their own name the datamodule (``datamodules.pascal.PascalFewShot``),
    whose ``dataset_class`` it means; a path that does not import stays as it is."""
    module, _, name = path.rpartition(".")
    try:
        bound = getattr(getattr(importlib.import_module(module), name), "dataset_class", None)
    except (ImportError, AttributeError, ValueError):
        return path
    return path if bound is None else f"{bound.__module__}.{bound.__qualname__}"


def stored_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint was written with: :data:`CHECKPOINT_KEY` (its ``dataset`` as
    :func:`dataset_path`), else the fold and shots of Lightning's
    ``datamodule_hyper_parameters``."""
    if isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
        settings = dict(checkpoint[CHECKPOINT_KEY])
        if isinstance(settings.get("dataset"), str):
            settings["dataset"] = dataset_path(settings["dataset"])
        return settings
    hparams = checkpoint.get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    return {k: hparams[k] for k in ("fold", "shots") if hparams.get(k) is not None}


def check_data_settings(
    checkpoint: dict[str, Any],
    datamodule: LightningDataModule | None,
    subcommand: str,
    path: str,
    mismatch: DataMismatch = "error",
) -> list[str]:
    """Raise a ``ValueError`` for the first :data:`DEFINING` setting that differs from the
    checkpoint's where that leaks (unless ``mismatch`` is ``allow``); return the differences
    allowed (other settings, other datamodule arguments), one ``name: old -> new`` each, and
    report them in one line."""
    current = data_settings(datamodule)
    if not current:
        return []
    stored = stored_settings(checkpoint)
    allowed = []
    for name, (option, refused_on) in DEFINING.items():
        if name not in stored or name not in current or stored[name] == current[name]:
            continue
        if subcommand in refused_on and mismatch != "allow":
            raise ValueError(
                f"--ckpt_path {path!r} was trained with {name} {stored[name]!r} but this "
                f"{subcommand} has {name} {current[name]!r} ({option}): "
                f"{LEAKS[subcommand]}; expected the checkpoint's {name}, or pass "
                "--data_mismatch allow to run anyway"
            )
        allowed.append(f"{name}: {stored[name]!r} -> {current[name]!r}")
    hparams = checkpoint.get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    now = dict(getattr(datamodule, "hparams", {}))
    for name in sorted(set(hparams) & set(now) - set(DEFINING) - UNREPORTED):
        if hparams[name] != now[name]:
            allowed.append(f"{name}: {hparams[name]!r} -> {now[name]!r}")
    if allowed:
        rank_zero_info(
            f"Data settings differing from checkpoint {path!r} (allowed): {'; '.join(allowed)}"
        )
    return allowed


#: Why a defining difference is refused, per command.
LEAKS = {
    "fit": "resuming would go on training another experiment",
    "validate": "the model would be scored on classes it may have trained on",
    "test": "the model would be scored on classes it may have trained on",
}
