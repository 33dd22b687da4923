"""Under real DDP, evaluation episodes are split across ranks without padding or duplicates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_data import write_pascal_tree

from datamodules import PascalFewShot

HERE = Path(__file__).parent


@pytest.mark.slow
def test_ddp_shards_are_disjoint_and_cover(tmp_path: Path) -> None:
    root = write_pascal_tree(tmp_path / "VOC2012")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    subprocess.run(
        [sys.executable, str(HERE / "ddp_episodes.py"), str(root), str(tmp_path / "cache"),
         str(tmp_path)],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    dm = PascalFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                       val_episodes=7, test_episodes=9)  # fmt: skip
    dm.setup()
    for stage, count in (("val", 7), ("test", 9)):
        expected = sorted(f"{e.query}/{e.class_id}" for e in dm.sampler(stage).episodes())
        assert len(expected) == count
        assert sorted(ranks[0][stage] + ranks[1][stage]) == expected  # no padding, no repeats
        assert {len(ranks[0][stage]), len(ranks[1][stage])} == {count // 2, count - count // 2}
    train = [ranks[0]["train"], ranks[1]["train"]]
    # 10 episodes cut to whole optimizer steps of 2 ranks x batch 2: 4 each
    assert len(train[0]) == len(train[1]) == 4 and not set(train[0]) & set(train[1])
