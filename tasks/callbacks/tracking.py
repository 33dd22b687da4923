"""Weights & Biases tracking that needs no account, survives the death of W&B's service process,
and config saving that survives re-runs."""

from __future__ import annotations

import functools
import netrc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def wandb_credentials_present() -> bool:
    """True when W&B can go online: ``WANDB_API_KEY`` or a netrc entry from ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


@functools.cache
def service_gone_errors() -> tuple[type[Exception], ...]:
    """What W&B's client raises once its service process (``wandb-core``, a child of the training
    process) is gone, seen with wandb 0.31: every call that sends to it (``run.log``,
    ``run.config.update``, ``run.summary[...] =``, ``run.mark_preempting()``, ``wandb.finish()``)
    raises ``ConnectionResetError`` ("Connection lost", or "[Errno 104] Connection reset by
    peer") at once (``BrokenPipeError`` is the other broken-socket error), though the first send
    right after the death may pass unnoticed (its data lost); a call waiting for
    the service's reply (``finish`` waiting for the exit record) raises ``HandleAbandonedError``,
    one sent after the replies stopped ``MailboxClosedError``. Nothing hangs."""
    try:
        from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError
    except ImportError:  # wandb before the mailbox package: the socket errors only
        return (ConnectionError,)
    return (ConnectionError, HandleAbandonedError, MailboxClosedError)


def sync_hint(run: Any) -> str:
    """Where the W&B run's own folder is (``<save_dir>/wandb/offline-run-<time>-<id>`` offline;
    ``run.dir`` is readable with the service gone) and how to upload it."""
    folder = Path(run.dir).parent
    return f"what W&B wrote before is in {folder}; `wandb sync {folder}` uploads it"


def forget_dead_run(run: Any) -> None:
    """Drop W&B's state for ``run`` whose service process is gone, so that nothing retries it:
    ``wandb.teardown()`` drops the broken service connection (with it the ``atexit`` hook that
    would print a ``ConnectionResetError`` traceback at exit; a later ``wandb.init`` starts a new
    service) and ``wandb.run`` is unset as ``wandb.finish()`` does (Lightning's WandbLogger would
    reuse a ``wandb.run`` left set). Call it only after :func:`service_gone_errors` was raised and
    warned about."""
    import wandb
    from wandb.sdk.lib import module

    try:
        wandb.teardown()
    except service_gone_errors():
        pass  # teardown sends a last message to the dead service: the failure already warned of
    if wandb.run is run:
        module.unset_globals()


def finish_wandb(exit_code: int | None = None) -> None:
    """``wandb.finish(exit_code)`` of the current run (``wandb.run``; nothing without one), with a
    warning naming W&B instead of an error when its service process is gone: the run's folder
    keeps what W&B wrote, training's results (checkpoints, exit code) are not W&B's."""
    import wandb

    run = wandb.run
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except service_gone_errors() as error:
        rank_zero_warn(
            f"W&B: could not close the run, its service process (wandb-core) is gone "
            f"({type(error).__name__}: {error}); {sync_hint(run)}"
        )
        forget_dead_run(run)


class AutoWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline unless the user is logged in, and not fatal to training
    when W&B's service process dies.

    ``offline=None`` (the default) means: online when ``WANDB_API_KEY`` is set or ``wandb login``
    was run, otherwise offline, with one line saying where the run is and how to sync it. An
    explicit ``offline`` or a ``WANDB_MODE`` in the environment always wins.

    W&B sends everything through a separate service process (``wandb-core``); killed (out of
    memory, a cluster's process reaper) it turns every later W&B call into a
    ``ConnectionResetError`` (:func:`service_gone_errors`), which Lightning's WandbLogger lets end
    ``fit`` before ``last.ckpt`` of the last step. Here the first such error is one warning naming
    W&B and the run's folder; from then on the logger does nothing (no retries), training,
    checkpoints (``ModelCheckpoint`` reads ``trainer.callback_metrics``, not the logger) and the
    exit code go on as if W&B were there, and ``finalize`` drops the dead run
    (:func:`forget_dead_run`) so that closing it at the end of the command is not attempted.
    """

    #: Set once W&B's service is found gone: the logger does nothing from then on.
    service_gone: bool = False

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        decide = offline is None and "WANDB_MODE" not in os.environ
        if decide:
            offline = not wandb_credentials_present()
        super().__init__(*args, offline=bool(offline), **kwargs)
        if decide and offline:
            save_dir = Path(self.save_dir or ".").resolve()
            rank_zero_info(
                f"W&B: no account configured, logging offline under {save_dir / 'wandb'}; "
                f"upload later with `wandb sync {save_dir / 'wandb'}/offline-run-*`"
            )

    def guarded(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """``call(*args, **kwargs)`` unless W&B's service is gone; the first error saying it is
        gone (:func:`service_gone_errors`) is one warning (naming ``what`` was being done) and
        stops every later W&B call of this logger."""
        if self.service_gone:
            return
        try:
            call(*args, **kwargs)
        except service_gone_errors() as error:
            self.service_gone = True
            where = f"; {sync_hint(self._experiment)}" if self._experiment is not None else ""
            rank_zero_warn(
                f"W&B: its service process (wandb-core) is gone ({type(error).__name__}: "
                f"{error}, while {what}); training goes on without W&B logging{where}"
            )

    def log_hyperparams(self, params: Any) -> None:
        self.guarded("logging hyper-parameters", super().log_hyperparams, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.guarded("logging metrics", super().log_metrics, metrics, step)

    # Images, tables and text reach W&B through log_metrics; with W&B gone they are not even built.
    def log_image(self, key: str, images: list[Any], step: int | None = None, **kw: Any) -> None:
        if not self.service_gone:
            super().log_image(key, images, step, **kw)

    def log_table(self, key: str, *args: Any, **kwargs: Any) -> None:
        if not self.service_gone:
            super().log_table(key, *args, **kwargs)

    def log_text(self, key: str, *args: Any, **kwargs: Any) -> None:
        if not self.service_gone:
            super().log_text(key, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self.guarded("logging a checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self.guarded("logging the checkpoints", super().finalize, status)
        if self.service_gone and self._experiment is not None:
            forget_dead_run(self._experiment)


class SaveConfigToRun(SaveConfigCallback):
    """Save the resolved config with the run: as the W&B run's config and as its ``config.yaml``.

    Lightning's default writes ``config.yaml`` into the logger's ``save_dir`` and refuses to
    overwrite it, so with W&B (``save_dir`` shared by all runs) a second run in the same folder
    fails, and the config never reaches W&B: a known LightningCLI + W&B pitfall. Here the file goes
    into the W&B run's own folder as ``cli_config.yaml`` (uploaded with the run; W&B keeps its own
    ``config.yaml`` there), or for other loggers into their versioned ``log_dir``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs = {"config_filename": "cli_config.yaml", **kwargs, "save_to_log_dir": False}
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folders = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run, config = logger.experiment, self.config.as_dict()
                if isinstance(logger, AutoWandbLogger):  # W&B's service may be gone already
                    update = run.config.update
                    logger.guarded("saving the config", update, config, allow_val_change=True)
                else:
                    run.config.update(config, allow_val_change=True)
                folders.append(Path(run.dir))
            elif logger.log_dir is not None:
                folders.append(Path(logger.log_dir))
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.config_filename).write_text(self.parser.dump(self.config))
