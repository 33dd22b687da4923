"""W&B's service process (``wandb-core``, a child of the training process) killed for real during a
run: one warning naming W&B, no more W&B calls, training, ``last.ckpt`` and the exit code as if
W&B were there, and what W&B wrote before the kill readable offline
(:class:`tasks.callbacks.tracking.AutoWandbLogger`, :func:`tasks.callbacks.tracking.finish_wandb`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import wandb
from test_resume import ENV, TIMEOUT, fit_command, start_and_wait_for_last
from test_segment import tiny_args
from wandb_records import OfflineRun

from tasks.callbacks.tracking import AutoWandbLogger, finish_wandb

GONE = "W&B: its service process (wandb-core) is gone"
NOT_CLOSED = "W&B: could not close the run, its service process (wandb-core) is gone"


def wandb_service(parent: int) -> int:
    """The pid of the ``wandb-core`` process started by process ``parent`` (found in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:  # ended meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and command.endswith(b"wandb-core"):
            found.append(int(entry.name))
    assert len(found) == 1, f"expected one wandb-core child of {parent}, found {found}"
    return found[0]


def kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it is dead (a zombie its parent has not reaped yet, or
    gone)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"wandb-core {pid} still alive 10 s after SIGKILL")


def steps_written(folder: Path) -> list[int]:
    """The ``trainer/global_step`` of each row in the run file so far."""
    rows = OfflineRun(folder, timeout=0).history()
    return [row["trainer/global_step"] for row in rows if "trainer/global_step" in row]


def gone_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "W&B:" in str(w.message)]


#: wandb-core writes the run file every 15 s by default (its ``x_transaction_log_flush_interval``
#: setting); every second here, so that what was logged before the kill is on disk when the test
#: kills it. Set with ``env``, which runs the command in its own process.
FLUSH_EVERY_SECOND = ("env", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=1")


@pytest.mark.slow
def test_fit_goes_on_when_the_wandb_service_dies(tmp_path: Path) -> None:
    every_step = ("--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.offline", "true")
    command = [*FLUSH_EVERY_SECOND, *fit_command(tmp_path, *every_step)]
    first, last = start_and_wait_for_last(tmp_path, command)
    (folder,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 30
    while max(steps_written(folder), default=-1) < 4:  # the first steps' rows are on disk
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first steps' rows never reached the run file"
        time.sleep(0.2)
    kill_and_wait(wandb_service(first.pid))
    written = OfflineRun(folder, timeout=0).history()  # what W&B wrote before it died

    try:
        code = first.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        first.kill()
        raise
    log = (tmp_path / "first.log").read_text()
    assert code == 0, log[-5000:]
    assert log.count(GONE) == 1, log[-5000:]  # one warning, then no more W&B calls
    (line,) = [line for line in log.splitlines() if GONE in line]
    assert "training goes on without W&B logging" in line
    assert f"`wandb sync {folder}` uploads it" in line
    assert "Traceback" not in log and NOT_CLOSED not in log, log[-5000:]
    final = torch.load(last, weights_only=False, map_location="cpu")
    assert final["epoch"] == 1 and final["global_step"] == 20  # all of training, saved

    run = OfflineRun(folder, timeout=0)
    assert run.exit_code is None  # never closed: its service was gone
    assert run.config()["data"]["class_path"] == "datamodules.ShapesFewShot"
    history = run.history()
    assert history[: len(written)] == written and any("train/loss" in row for row in written)
    assert max(steps_written(folder)) < 19  # nothing of the steps after the kill reached W&B


KILL_WANDB_AT_FIT_END = """
import os, signal, time
from pathlib import Path
from lightning.pytorch import Callback

class KillWandbAtFitEnd(Callback):
    def on_fit_end(self, trainer, pl_module):
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().split(b"\\0")[0]
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid() and command.endswith(b"wandb-core"):
                os.kill(int(entry.name), signal.SIGKILL)
                print("killed wandb-core", flush=True)
        time.sleep(1)  # its socket seen closed
"""


@pytest.mark.slow
def test_the_wandb_service_dying_after_the_last_log_is_a_warning_at_the_end(
    tmp_path: Path,
) -> None:
    """Killed after ``fit``'s last W&B call, nothing noticed it during training: closing the run
    at the end of the command (``tasks.cli.finished_wandb_run`` -> :func:`finish_wandb`) warns
    instead of failing the command."""
    (tmp_path / "kill_wandb_at_fit_end.py").write_text(KILL_WANDB_AT_FIT_END)
    path = os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "tasks.segment", "fit", *tiny_args(tmp_path),
               "--trainer.logger.init_args.offline", "true", "--trainer.max_steps", "3",
               "--trainer.limit_val_batches", "1",
               "--trainer.callbacks+=kill_wandb_at_fit_end.KillWandbAtFitEnd"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=ENV | {"PYTHONPATH": path},
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    log = done.stdout + done.stderr
    assert "killed wandb-core" in log
    assert done.returncode == 0, log[-5000:]
    assert log.count(NOT_CLOSED) == 1 and GONE not in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    assert torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False,
                      map_location="cpu")["global_step"] == 3  # fmt: skip


def test_a_dead_service_is_one_warning_then_the_logger_stops(tmp_path: Path) -> None:
    """In this process: the logger's first call after the kill that fails warns, the others do
    nothing; ``finalize`` drops the dead run (nothing left for ``finish_wandb`` to close) and a
    new run gets a new service."""
    logger = AutoWandbLogger(offline=True, save_dir=str(tmp_path), project="service")
    logger.log_metrics({"loss": 1.0}, step=0)
    folder = Path(logger.experiment.dir).parent
    kill_and_wait(wandb_service(os.getpid()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):  # the first send after the death may pass unnoticed
            logger.log_metrics({"loss": 1.0 / step}, step=step)
            time.sleep(0.1)
        logger.log_hyperparams({"lr": 0.1})
        logger.log_table("results", columns=["a"], data=[[1]])
        logger.finalize("success")
        assert wandb.run is None
        finish_wandb(exit_code=0)  # the end of the command: nothing to close
    (message,) = gone_warnings(caught)
    assert message.startswith(GONE) and "while logging metrics" in message
    assert f"`wandb sync {folder}` uploads it" in message
    fresh = wandb.init(mode="offline", dir=tmp_path / "fresh", project="service")
    fresh.log({"ok": 1})
    finish_wandb()
    assert wandb.run is None and OfflineRun(Path(fresh.dir).parent).exit_code == 0


def test_finish_wandb_with_the_service_gone_warns_and_drops_the_run(tmp_path: Path) -> None:
    run = wandb.init(mode="offline", dir=tmp_path, project="service")
    run.log({"loss": 1.0})
    kill_and_wait(wandb_service(os.getpid()))
    time.sleep(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finish_wandb(exit_code=143)
        finish_wandb(exit_code=143)  # the run is dropped: not closed again
    (message,) = gone_warnings(caught)
    assert message.startswith(NOT_CLOSED)
    assert f"`wandb sync {Path(run.dir).parent}` uploads it" in message
    assert wandb.run is None
    fresh = wandb.init(mode="offline", dir=tmp_path / "fresh", project="service")
    finish_wandb()
    assert OfflineRun(Path(fresh.dir).parent).exit_code == 0
