"""Checkpoints that survive kills and interrupts.

* :class:`AtomicCheckpointIO` -- Lightning writes checkpoints through fsspec, whose local
  "transaction" writes to a temporary file in ``/tmp`` and moves it into place; across
  filesystems (``/tmp`` local, checkpoints on NFS or Lustre) the move is a copy into the final
  path, so a kill during it leaves a truncated ``last.ckpt`` and the previous one is gone. Here
  the checkpoint is streamed into a temporary file *in the destination folder*, flushed to disk
  and renamed over the old one (``os.replace``, atomic on POSIX): a reader sees the old file or
  the new one, never a partial one.
* :class:`SaveLastOnInterrupt` -- Ctrl-C (SIGINT) or SIGTERM (cluster pre-emption, ``docker
  stop``, ``timeout``) in a single-process run refreshes every ``ModelCheckpoint``'s
  ``last.ckpt`` before Lightning shuts down, so ``fit --ckpt_path last`` resumes from the
  interrupted step. SIGTERM goes through Lightning's own handling (``_SignalConnector`` sets
  ``trainer.received_sigterm``; the loops raise ``SIGTERMException`` after the running batch,
  as for SLURM's requeue), so the checkpoint is taken between steps; the W&B run is marked
  preempting, and :func:`tasks.cli.run_cli` turns the exception (a ``SystemExit`` with no code,
  which would exit 0) into exit code 143 (128 + SIGTERM). (Lightning's ``save_on_exception``
  saves on *any* error, also on one rank of a DDP job, where the collective save would wait on
  the other ranks.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary sibling, then an atomic rename (local paths only; other
    URLs go through Lightning's fsspec writer)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(Path(path)) as file:
            save_interruptible(checkpoint, file)


def save_interruptible(checkpoint: dict[str, Any], file: BinaryIO) -> None:
    """``torch.save``, except that Ctrl-C inside the write raises ``KeyboardInterrupt``: torch's
    zip writer then fails to close the file and raises a ``RuntimeError`` whose context is the
    interrupt, which Lightning would treat as a crash (and :class:`SaveLastOnInterrupt` would
    not save)."""
    try:
        torch.save(checkpoint, file)
    except RuntimeError as error:
        if isinstance(error.__context__, KeyboardInterrupt):
            raise error.__context__ from error
        raise


class SaveLastOnInterrupt(Callback):
    """On Ctrl-C or SIGTERM in a single-process run, write ``last.ckpt`` of each
    ``ModelCheckpoint`` that keeps one, and mark the W&B run preempting on SIGTERM (see the
    module docstring)."""

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        stop = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if isinstance(exception, SIGTERMException):
            mark_preempting(trainer)
        if trainer.world_size > 1 or not trainer.training or trainer.sanity_checking:
            return
        folders = {
            Path(callback.dirpath)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
        }
        for folder in sorted(folders):
            path = (
                folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            )
            trainer.save_checkpoint(path)
            rank_zero_info(f"{stop} at global step {trainer.global_step}: saved {path}")


def mark_preempting(trainer: Trainer) -> None:
    """Tell each W&B run that it is being pre-empted (its state on the server: "preempted",
    resumable), with a warning if W&B cannot be reached any more."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            try:
                logger.experiment.mark_preempting()
            except Exception as error:  # W&B's service gone: the checkpoint matters more
                rank_zero_warn(f"W&B: could not mark the run preempting ({error})")
