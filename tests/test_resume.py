"""A fit killed with SIGKILL mid-epoch resumes with ``--ckpt_path last`` into the same W&B run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_segment import tiny_args

TIMEOUT = 300
CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_top_k: 0, save_last: true, every_n_train_steps: 5}
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_the_same_run(tmp_path: Path) -> None:
    config = tmp_path / "checkpoint_every_5_steps.yaml"
    config.write_text(CHECKPOINTS)
    command = [sys.executable, "-m", "tasks.segment", "fit", *tiny_args(tmp_path),
               "--config", str(config), "--data.train_episodes", "40",
               "--trainer.max_epochs", "2"]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + TIMEOUT
    last = None
    while last is None:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
        time.sleep(0.5)
        last = next((tmp_path / "runs").rglob("last.ckpt"), None)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed = torch.load(last, weights_only=False, map_location="cpu")
    assert killed["epoch"] == 0 and killed["global_step"] == 5  # mid-epoch: 10 steps per epoch

    resumed = subprocess.run([*command, "--ckpt_path", "last"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    final = torch.load(last, weights_only=False, map_location="cpu")
    assert final["epoch"] == 1 and final["global_step"] == 20  # 2 epochs of 40 episodes / 4
    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1
    assert last.parent.parent.name == runs[0].name.rsplit("-", 1)[1]
