"""benchmarks.vs_official without the official code: the checkout is looked up (and refused
with the command that fetches it), imports from it leave no module behind, and the run-time
patches undo themselves. The timing itself needs the papers' repositories (BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.vs_official import (
    PAPER_BINS,
    PAPER_SUPERPIXEL_AREA,
    OfficialCodeMissing,
    cuda_calls_on,
    official_checkout,
    official_imports,
    parse_arguments,
    pyramid_bins,
    superpixel_area,
)


def fake_checkout(root: Path, marker: str = "model/PFENet.py") -> Path:
    (root / marker).parent.mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("")
    (root / marker).write_text("ANSWER = 42\n")
    return root


def test_missing_checkout_names_the_repository_and_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(OfficialCodeMissing) as error:
        parse_arguments(["--official-root", str(tmp_path), "--method", "pfenet"])
    message = str(error.value)
    assert "dvlab-research/PFENet" in message
    assert f"git clone https://github.com/dvlab-research/PFENet {tmp_path / 'PFENet'}" in message


def test_checkout_is_the_root_or_a_folder_named_after_the_repository(tmp_path: Path) -> None:
    direct = fake_checkout(tmp_path / "mine")
    assert official_checkout(direct, "pfenet") == direct
    nested = fake_checkout(tmp_path / "all" / "hsnet", "model/hsnet.py")
    assert official_checkout(tmp_path / "all", "hsnet") == nested
    with pytest.raises(OfficialCodeMissing, match="juhongm999/hsnet"):
        official_checkout(direct, "hsnet")
    args = parse_arguments(
        ["--official-root", str(direct), "--method", "pfenet", "--device", "cpu"]
    )
    assert args.tolerance == 1e-4 and args.shots == [1, 5]


def test_official_imports_leave_no_module_behind(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "PFENet")
    with official_imports(root):
        from model.PFENet import ANSWER  # type: ignore[import-not-found]

    assert ANSWER == 42
    assert "model" not in sys.modules and "model.PFENet" not in sys.modules
    assert str(root) not in sys.path


def test_cuda_calls_go_to_the_device_and_the_patch_is_undone() -> None:
    original = torch.Tensor.cuda
    x = torch.ones(2)
    with cuda_calls_on(torch.device("cpu")):
        assert x.cuda() is x
    assert torch.Tensor.cuda is original


def test_paper_settings_at_473_and_scaled_below() -> None:
    assert pyramid_bins(473) == list(PAPER_BINS)
    assert superpixel_area(473) == PAPER_SUPERPIXEL_AREA
    assert pyramid_bins(129) == [17, 17, 15, 8]
    assert superpixel_area(129) == pytest.approx(100 * (17 / 60) ** 2)
