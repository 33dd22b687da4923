"""Checkpoints that survive kills and interrupts.

* :class:`AtomicCheckpointIO` -- Lightning writes checkpoints through fsspec, whose local
  "transaction" writes to a temporary file in ``/tmp`` and moves it into place; across
  filesystems (``/tmp`` local, checkpoints on NFS or Lustre) the move is a copy into the final
  path, so a kill during it leaves a truncated ``last.ckpt`` and the previous one is gone. Here
  the checkpoint is streamed into a temporary file *in the destination folder*, flushed to disk
  and renamed over the old one (``os.replace``, atomic on POSIX): a reader sees the old file or
  the new one, never a partial one.
* :class:`SaveLastOnInterrupt` -- Ctrl-C (SIGINT) or SIGTERM (cluster pre-emption, ``docker
  stop``, ``timeout``) during ``fit`` refreshes every ``ModelCheckpoint``'s ``last.ckpt`` before
  Lightning shuts down, so ``fit --ckpt_path last`` resumes from the interrupted step. In one
  process SIGTERM goes through Lightning's own handling (``_SignalConnector`` sets
  ``trainer.received_sigterm``; the loops raise ``SIGTERMException`` after the running batch,
  as for SLURM's requeue), so the checkpoint is taken between steps; the W&B run is marked
  preempting, and :func:`tasks.cli.run_cli` turns the exception (a ``SystemExit`` with no code,
  which would exit 0) into exit code 143 (128 + SIGTERM).

  A stop while a best checkpoint is written leaves no such file (the write is atomic), but its
  ``ModelCheckpoint`` has already recorded it as the best: the ``last.ckpt`` saved here would
  resume with a best that does not exist, and a resumed run that never beats its score ends with
  no best file at all. The records of unwritten files are dropped first
  (:func:`forget_unwritten`).

  A stop during ``fit``'s validation saves too, with the validation rewound to its start
  (:func:`rewind_validation`): the metrics of the batches already run are not in a checkpoint,
  so the resumed run scores the whole validation again.

  Under DDP, Lightning 2.6's SIGTERM handler broadcasts from inside the signal handler, in the
  middle of whatever collective the rank is running; measured on two gloo ranks, the job hangs
  and ``last.ckpt`` stays at the last periodic save. And Ctrl-C raises ``KeyboardInterrupt``
  on each rank wherever it is, so no collective save can follow. Here both signals are only
  recorded (SIGTERM passed on to the ranks the launcher started; a terminal's Ctrl-C reaches
  every rank itself); each training batch ends with one all-reduce of that flag, and every rank
  stops after the same batch, where the save is collective. A stop during DDP validation takes
  effect after it; a second Ctrl-C stops at once, without a save. (Lightning's
  ``save_on_exception`` saves on *any* error, also on one rank of a DDP job, where the
  collective save would wait on the other ranks.)
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.files import atomic_file
from tasks.callbacks.tracking import service_gone_errors


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
    """On Ctrl-C or SIGTERM during ``fit`` (training or validation), write ``last.ckpt`` of each
    ``ModelCheckpoint`` that keeps one, and mark the W&B run preempting on SIGTERM; under DDP,
    every rank stops at the same step (see the module docstring)."""

    def __init__(self) -> None:
        self._stopped_in_validation = False
        self._stop_signal: int | None = None  # under DDP: the first stop signal this rank got
        self._stop_agreed = False
        self._launcher: Any = None
        self._sigint_handler: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under DDP, handle SIGTERM (replacing the handler Lightning has just installed and
        restores in its teardown) and SIGINT by :meth:`_note_stop`."""
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            self._stop_signal, self._stop_agreed = None, False
            self._launcher = trainer.strategy.launcher
            signal.signal(signal.SIGTERM, self._note_stop)
            self._sigint_handler = signal.signal(signal.SIGINT, self._note_stop)

    def _note_stop(self, signum: int, frame: FrameType | None) -> None:
        """Record the signal; nothing collective happens in a signal handler. SIGTERM is passed
        on to the ranks this process launched (as Lightning does); a terminal's Ctrl-C reaches
        every rank itself, and a second one stops this rank at once."""
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print(
                "Ctrl-C: every rank stops after this training step and saves last.ckpt; "
                "press it again to stop now",
                file=sys.stderr,
                flush=True,
            )
        elif self._stop_signal is None and self._launcher is not None:
            self._launcher.kill(signum)
        self._stop_signal = self._stop_signal or signum

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Under DDP, stop every rank after the same batch once any rank got a stop signal: as
        SIGTERM (``SIGTERMException``) if any got SIGTERM, else as Ctrl-C."""
        if trainer.world_size == 1:
            return
        code = {None: 0, signal.SIGINT: 1, signal.SIGTERM: 2}[self._stop_signal]
        flag = torch.tensor(code, device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if agreed == 0:
            return
        self._stop_agreed = True
        if agreed == 2:
            trainer._signal_connector.received_sigterm = True
            raise SIGTERMException
        raise KeyboardInterrupt

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        """Put back the SIGINT handler :meth:`on_train_start` replaced, unless another one took
        over since (Lightning ignores SIGINT while it shuts down after a Ctrl-C)."""
        if self._sigint_handler is not None and signal.getsignal(signal.SIGINT) == self._note_stop:
            signal.signal(signal.SIGINT, self._sigint_handler)
        self._sigint_handler = None

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        stop = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if isinstance(exception, SIGTERMException):
            mark_preempting(trainer)
        # Under DDP only an agreed stop is one step on every rank (a collective save).
        together = trainer.world_size == 1 or self._stop_agreed
        if not together or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        folders = {
            Path(callback.dirpath)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
        }
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                forget_unwritten(callback)
        self._stopped_in_validation = trainer.validating
        where = " (validation rewound to its start)" if trainer.validating else ""
        try:
            for folder in sorted(folders):
                name = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
                trainer.save_checkpoint(folder / name)
                rank_zero_info(
                    f"{stop} at global step {trainer.global_step}{where}: saved {folder / name}"
                )
        finally:
            self._stopped_in_validation = False

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._stopped_in_validation:
            rewind_validation(checkpoint)


def forget_unwritten(callback: ModelCheckpoint) -> None:
    """Drop from ``callback``'s top-k record the checkpoints whose files are not there (a write
    the stop interrupted), and take its best and k-th best from what is left, as
    ``ModelCheckpoint`` itself ranks them."""
    written = {
        path: score for path, score in callback.best_k_models.items() if Path(path).is_file()
    }
    if len(written) == len(callback.best_k_models):
        return
    rank_zero_info(
        "not written before the stop, forgotten as best checkpoints: "
        + ", ".join(sorted(set(callback.best_k_models) - set(written)))
    )
    callback.best_k_models = written
    maximise = callback.mode == "max"
    if written:
        best = (max if maximise else min)(written, key=lambda path: float(written[path]))
        kth = (min if maximise else max)(written, key=lambda path: float(written[path]))
        callback.best_model_path, callback.best_model_score = best, written[best]
        callback.kth_best_model_path, callback.kth_value = kth, written[kth]
    else:
        callback.best_model_path, callback.best_model_score = "", None
        callback.kth_best_model_path = ""
        callback.kth_value = torch.tensor(-torch.inf if maximise else torch.inf)


#: Where ``fit``'s checkpoints keep the progress of its validation loop.
VALIDATION_PROGRESS = ("loops", "fit_loop", "epoch_loop.val_loop.batch_progress")


def rewind_validation(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint taken during ``fit``'s validation resume by running that validation
    from its first batch.

    Saved as it is (a stop lands between batches), Lightning 2.6 resumes by skipping the rest of
    that validation, so the epoch's score and its best-checkpoint decision would be missing; the
    metrics of the batches already run are not in the checkpoint to finish it either. The
    progress is set to "first batch started, none done", which Lightning reads as a restart in
    the middle of an evaluation (``RESTARTED_MID_EVALUATION``) with nothing to skip.
    """
    *parents, key = VALIDATION_PROGRESS
    loops = checkpoint
    for parent in parents:
        loops = loops[parent]
    progress = loops[key]
    done = progress["total"]["completed"] - progress["current"]["completed"]
    progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done,
                         "completed": done}  # fmt: skip
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False


def mark_preempting(trainer: Trainer) -> None:
    """Tell each W&B run that it is being pre-empted (its state on the server: "preempted",
    resumable), with a warning if W&B cannot be reached any more."""
    for logger in trainer.loggers:
        gone = getattr(logger, "service_gone", False)  # already warned of (AutoWandbLogger)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and not gone:
            try:
                logger.experiment.mark_preempting()
            except service_gone_errors() as error:  # the checkpoint matters more
                rank_zero_warn(
                    f"W&B: could not mark the run preempting, its service process (wandb-core) "
                    f"is gone ({type(error).__name__}: {error})"
                )
