"""Same seed and config on the CPU: identical training; identical test results whatever the
number of loader workers (process counts: :mod:`tests.test_ddp`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_segment import tiny_args

from tasks.segment import main

LIMITS = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"]


def fit(tmp_path: Path, name: str) -> dict:
    runs = tmp_path / name
    main(["fit", *tiny_args(tmp_path), *LIMITS, "--trainer.logger.init_args.save_dir", str(runs)])
    (last,) = runs.rglob("last.ckpt")
    return torch.load(last, weights_only=False, map_location="cpu")


@pytest.mark.slow
def test_two_fits_with_one_seed_are_identical(tmp_path: Path) -> None:
    first, second = fit(tmp_path, "first"), fit(tmp_path, "second")
    assert first["global_step"] == second["global_step"] == 6
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    scores = [
        [
            state["best_model_score"]
            for name, state in run["callbacks"].items()
            if "val/miou" in name
        ]
        for run in (first, second)
    ]
    assert scores[0] == scores[1] and scores[0][0] is not None


@pytest.mark.slow
def test_test_results_do_not_depend_on_loader_workers(tmp_path: Path) -> None:
    fit(tmp_path, "runs")
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    results = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        main(["test", *tiny_args(tmp_path), "--ckpt_path", str(checkpoint),
              "--data.num_workers", str(workers), "--data.test_seeds", "2",
              "--results.output_dir", str(out)])  # fmt: skip
        (path,) = out.glob("*.results.json")
        results[workers] = json.loads(path.read_text())["per_seed"]
    assert results[0] == results[2] and len(results[0]) == 2
