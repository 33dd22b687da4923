"""Faults during ``fit``: SIGKILL mid-epoch, Ctrl-C, and a kill while a checkpoint is written;
each run then resumes with ``--ckpt_path last`` into the same W&B run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_segment import tiny_args
from wandb_records import OfflineRun

from tasks.callbacks.checkpointing import atomic_file, save_interruptible

TIMEOUT = 300
CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_top_k: 0, save_last: true, every_n_train_steps: 5}
"""


def fit_command(tmp_path: Path, *extra: str) -> list[str]:
    """2 epochs of 10 steps, ``last.ckpt`` every 5 steps."""
    config = tmp_path / "checkpoint_every_5_steps.yaml"
    config.write_text(CHECKPOINTS)
    return [sys.executable, "-m", "tasks.segment", "fit", *tiny_args(tmp_path),
            "--config", str(config), "--data.train_episodes", "40",
            "--trainer.max_epochs", "2", *extra]  # fmt: skip


ENV = os.environ | {"PYTHONUNBUFFERED": "1"}


def start_and_wait_for_last(tmp_path: Path, command: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``fit`` and return once its first ``last.ckpt`` exists."""
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=log, stderr=log)
    deadline = time.monotonic() + TIMEOUT
    last = None
    while last is None:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
        time.sleep(0.2)
        last = next((tmp_path / "runs").rglob("last.ckpt"), None)
    return first, last


def resume_to_the_end(tmp_path: Path, command: list[str], last: Path) -> None:
    """``--ckpt_path last`` completes the 20 steps in the first run's W&B run."""
    resumed = subprocess.run([*command, "--ckpt_path", "last"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    final = torch.load(last, weights_only=False, map_location="cpu")
    assert final["epoch"] == 1 and final["global_step"] == 20  # 2 epochs of 40 episodes / 4
    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1
    assert last.parent.parent.name == runs[0].name.rsplit("-", 1)[1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_the_same_run(tmp_path: Path) -> None:
    command = fit_command(tmp_path)
    first, last = start_and_wait_for_last(tmp_path, command)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed = torch.load(last, weights_only=False, map_location="cpu")
    assert killed["epoch"] == 0 and killed["global_step"] == 5  # mid-epoch: 10 steps per epoch
    resume_to_the_end(tmp_path, command, last)


@pytest.mark.slow
def test_ctrl_c_saves_last_checkpoint_and_closes_the_wandb_run(tmp_path: Path) -> None:
    command = fit_command(tmp_path)
    first, last = start_and_wait_for_last(tmp_path, command)
    time.sleep(1.0)  # a few steps past the periodic checkpoint
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) != 0
    log = (tmp_path / "first.log").read_text()
    interrupted = torch.load(last, weights_only=False, map_location="cpu")
    assert f"Interrupted at global step {interrupted['global_step']}: saved" in log, log[-3000:]
    assert 5 <= interrupted["global_step"] < 20
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert OfflineRun(run).exit_code not in (None, 0)  # closed, and marked failed
    resume_to_the_end(tmp_path, command, last)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    """The second periodic save dies half-way; ``last.ckpt`` of step 5 stays whole."""
    callback = tmp_path / "kill_on_second_save.py"
    callback.write_text(KILL_ON_SECOND_SAVE)
    command = fit_command(tmp_path)
    path = os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))
    killed = subprocess.run([*command, "--trainer.callbacks+=kill_on_second_save.KillOnSecondSave"],
                            cwd=tmp_path, env=ENV | {"PYTHONPATH": path},
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 5
    assert list(last.parent.glob(".last.ckpt.*.part"))  # the interrupted write, never renamed
    resume_to_the_end(tmp_path, command, last)


KILL_ON_SECOND_SAVE = """
import os, signal
from lightning.pytorch import Callback

class KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

class KillOnSecondSave(Callback):
    saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.saves == 2:
            checkpoint["kill"] = KillWhenPickled()
"""


def test_atomic_file_leaves_the_target_untouched_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_file(target) as file:
        file.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as file:
        file.write(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


class InterruptedFile(io.BytesIO):
    """A file whose third write is interrupted by Ctrl-C."""

    writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def test_ctrl_c_during_a_checkpoint_write_is_an_interrupt() -> None:
    """torch's zip writer turns an interrupt mid-write into a RuntimeError whose context is the
    KeyboardInterrupt (pinned here); the checkpoint IO raises the interrupt itself."""
    checkpoint = {"weights": torch.zeros(100_000), "bias": torch.ones(1000)}
    with pytest.raises(RuntimeError) as error:
        torch.save(checkpoint, InterruptedFile())
    assert isinstance(error.value.__context__, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        save_interruptible(checkpoint, InterruptedFile())
