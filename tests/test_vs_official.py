"""benchmarks.vs_official without the official code: the checkout is looked up (and refused
with the command that fetches it), imports from it leave no module behind, the run-time
patches undo themselves, and BAM's episodes reach it as its loader gives them. The timing
itself needs the papers' repositories (BENCHMARKS.md)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import synthetic_batch
from benchmarks.vs_official import (
    FOLD0_BASE,
    PAPER_BINS,
    PAPER_SUPERPIXEL_AREA,
    OfficialBAM,
    OfficialCodeMissing,
    cuda_calls_on,
    official_checkout,
    official_imports,
    parse_arguments,
    pyramid_bins,
    stubbed_imports,
    superpixel_area,
    working_directory,
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
    bam = fake_checkout(tmp_path / "all" / "BAM", "model/BAM.py")
    assert official_checkout(tmp_path / "all", "bam") == bam
    with pytest.raises(OfficialCodeMissing, match="chunbolang/BAM"):
        official_checkout(direct, "bam")
    args = parse_arguments(
        ["--official-root", str(direct), "--method", "pfenet", "--device", "cpu"]
    )
    assert args.tolerance == 1e-4 and args.shots == [1, 5]


def test_default_methods_are_those_whose_checkouts_the_root_holds(tmp_path: Path) -> None:
    fake_checkout(tmp_path / "PFENet")
    fake_checkout(tmp_path / "BAM", "model/BAM.py")
    assert parse_arguments(["--official-root", str(tmp_path)]).method == ["pfenet", "bam"]
    with pytest.raises(OfficialCodeMissing, match="chunbolang/BAM"):
        parse_arguments(["--official-root", str(tmp_path / "PFENet" / "model")])


def test_official_imports_leave_no_module_behind(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "PFENet")
    with official_imports(root):
        from model.PFENet import ANSWER  # type: ignore[import-not-found]

    assert ANSWER == 42
    assert "model" not in sys.modules and "model.PFENet" not in sys.modules
    assert str(root) not in sys.path


def test_cuda_calls_go_to_the_device_and_the_patch_is_undone() -> None:
    original, arange = torch.Tensor.cuda, torch.arange
    x = torch.ones(2)
    with cuda_calls_on(torch.device("cpu")):
        assert x.cuda() is x
        ids = torch.arange(16, device="cuda")  # BAM's training ensemble
        assert ids.device.type == "cpu" and ids.tolist() == list(range(16))
        assert torch.arange(1, 4, dtype=torch.float32).tolist() == [1.0, 2.0, 3.0]
    assert torch.Tensor.cuda is original and torch.arange is arange


def test_absent_plotting_packages_import_as_stubs_for_the_context_only() -> None:
    """BAM's ``util/util.py`` imports matplotlib, seaborn... at top level: where one is not
    installed it imports as a placeholder while the official code is imported, then is gone."""
    absent = "surely_not_an_installed_package"
    with stubbed_imports([absent, "json"]) as missing:
        pyplot = importlib.import_module(f"{absent}.pyplot")
        json = importlib.import_module("json")
        assert missing == [absent]
        assert pyplot.MultipleLocator is not None
        assert json.dumps([1]) == "[1]"  # installed: the real package
    assert absent not in sys.modules and f"{absent}.pyplot" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        __import__(absent)


def test_working_directory_is_restored(tmp_path: Path) -> None:
    before = Path.cwd()
    with working_directory(tmp_path):
        assert Path.cwd() == tmp_path.resolve()
    assert Path.cwd() == before


def test_bam_trains_on_base_classes_and_passes_them_as_its_loader_does() -> None:
    """The evaluation episodes are fold 0's novel classes (BAM sums every base class), the
    training ones its first base classes: ``cat_idx`` their rank among the base classes (the
    project's ``base_channels - 1``) and ``y_b`` the query's foreground at that channel."""
    batch = synthetic_batch(3, 2, 17, torch.device("cpu"))
    assert batch["class_id"].tolist() == [0, 1, 2]  # fold 0's novel classes
    official = object.__new__(OfficialBAM)  # the inputs need no model
    train = official.training_batch(batch)
    assert train["class_id"].tolist() == [5, 6, 7] and set(train["class_id"].tolist()) <= set(
        FOLD0_BASE
    )
    inputs = official.inputs(train)
    assert inputs["cat_idx"][0].tolist() == [0, 1, 2]
    foreground = train["query_mask"] == 1
    for i, channel in enumerate([1, 2, 3]):
        assert (inputs["y_b"][i][foreground[i]] == channel).all()
        assert (inputs["y_b"][i][~foreground[i]] == 0).all()
    assert inputs["y_m"] is train["query_mask"] and inputs["s_x"] is train["support_images"]


def test_paper_settings_at_473_and_scaled_below() -> None:
    assert pyramid_bins(473) == list(PAPER_BINS)
    assert superpixel_area(473) == PAPER_SUPERPIXEL_AREA
    assert pyramid_bins(129) == [17, 17, 15, 8]
    assert superpixel_area(129) == pytest.approx(100 * (17 / 60) ** 2)
