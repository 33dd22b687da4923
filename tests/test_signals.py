"""SIGTERM during ``fit`` (cluster pre-emption, ``docker stop``, ``timeout``) behaves as Ctrl-C:
``last.ckpt`` at the interrupted step, the W&B run marked preempting and closed with the exit
code, a non-zero exit, and ``fit --ckpt_path last`` finishes the run. A real ``python -m
tasks.segment fit`` on the tiny shapes set, as tests/test_resume.py runs it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from test_resume import fit_command, resume_to_the_end, start_and_wait_for_last
from wandb_records import OfflineRun

from tasks.cli import SIGTERM_EXIT


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
