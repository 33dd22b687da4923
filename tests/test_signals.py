"""SIGTERM during ``fit`` (cluster pre-emption, ``docker stop``, ``timeout``) behaves as Ctrl-C:
``last.ckpt`` at the interrupted step, the W&B run marked preempting and closed with the exit
code, a non-zero exit, and ``fit --ckpt_path last`` finishes the run; also during validation
(the resumed run validates again from the first batch) and under DDP (every rank stops at the
same step). A real ``python -m tasks.segment fit`` on the tiny shapes set, as
tests/test_resume.py runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_resume import ENV, TIMEOUT, fit_command, resume_to_the_end, start_and_wait_for_last
from wandb_records import OfflineRun

from tasks.errors import SIGTERM_EXIT


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_non_zero_and_resumes(tmp_path: Path) -> None:
    command = fit_command(tmp_path)
    first, last = start_and_wait_for_last(tmp_path, command)
    time.sleep(1.0)  # a few steps past the periodic checkpoint
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == SIGTERM_EXIT == 143
    log = (tmp_path / "first.log").read_text()
    stopped = torch.load(last, weights_only=False, map_location="cpu")
    assert f"SIGTERM at global step {stopped['global_step']}: saved" in log, log[-3000:]
    assert 5 < stopped["global_step"] < 20, "not saved at the interrupted step"
    (folder,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    run = OfflineRun(folder)
    assert run.exit_code == SIGTERM_EXIT
    kinds = {record.WhichOneof("record_type") for record in run.records}
    assert "preempting" in kinds, sorted(kinds)
    resume_to_the_end(tmp_path, command, last)


SIGTERM_IN_FIRST_VALIDATION = """
import os, signal
from pathlib import Path
from lightning.pytorch import Callback

class SigtermInFirstValidation(Callback):
    \"\"\"SIGTERM to this process at the third batch of the first validation (once per folder);
    each validation's batch count printed.\"\"\"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches = 0 if batch_idx == 0 else self.batches
        once = Path("sigterm-sent")
        if not trainer.sanity_checking and batch_idx == 2 and not once.exists():
            once.touch()
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, *args, **kwargs):
        self.batches += 1

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            print(f"validation at step {trainer.global_step}: {self.batches} batches", flush=True)
"""


@pytest.mark.slow
def test_sigterm_during_validation_saves_and_the_resumed_run_validates_again(
    tmp_path: Path,
) -> None:
    """Stopped at validation batch 3 of 6 after step 10: ``last.ckpt`` of step 10, and the
    resumed run runs that validation's 6 batches (not the rest of it, nor none) before step 11."""
    (tmp_path / "sigterm_in_validation.py").write_text(SIGTERM_IN_FIRST_VALIDATION)
    callback = "--trainer.callbacks+=sigterm_in_validation.SigtermInFirstValidation"
    command = fit_command(tmp_path, "--data.val_episodes", "24", callback)
    path = os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))
    env = ENV | {"PYTHONPATH": path}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)  # fmt: skip
    log = first.stdout + first.stderr
    assert first.returncode == SIGTERM_EXIT, log[-3000:]
    assert "SIGTERM at global step 10 (validation rewound to its start): saved" in log, log[-3000:]
    assert "validation at step 10" not in log
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 10
    resumed = subprocess.run([*command, "--ckpt_path", "last"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    validations = [line for line in resumed.stdout.splitlines() if line.startswith("validation")]
    assert validations == ["validation at step 10: 6 batches", "validation at step 20: 6 batches"]
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 20


DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--data.batch_size", "2")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "exit_code", "saved"),
    [(signal.SIGTERM, SIGTERM_EXIT, "SIGTERM"), (signal.SIGINT, 1, "Interrupted")],
    ids=["sigterm-to-the-launcher", "ctrl-c-to-the-process-group"],
)
def test_a_stop_under_ddp_stops_every_rank_at_one_step_and_resumes(
    tmp_path: Path, stop: signal.Signals, exit_code: int, saved: str
) -> None:
    """Two gloo ranks. SIGTERM to the launching process, as ``timeout`` or ``docker stop`` send
    it (Lightning 2.6's own handler hangs this job), or Ctrl-C to the whole process group, as a
    terminal sends it (each rank used to stop where it was, without a save): the command exits
    within seconds, ``last.ckpt`` is at the interrupted step, and ``--ckpt_path last`` under DDP
    finishes the run."""
    command = fit_command(tmp_path, *DDP)
    first, last = start_and_wait_for_last(tmp_path, command)
    time.sleep(1.0)  # a few steps past the periodic checkpoint
    if stop == signal.SIGINT:
        os.killpg(first.pid, signal.SIGINT)
    else:
        first.send_signal(stop)
    assert first.wait(timeout=60) == exit_code
    log = (tmp_path / "first.log").read_text()
    stopped = torch.load(last, weights_only=False, map_location="cpu")
    assert f"{saved} at global step {stopped['global_step']}: saved" in log, log[-3000:]
    assert 5 < stopped["global_step"] < 20, "not saved at the interrupted step"
    resume_to_the_end(tmp_path, command, last)
