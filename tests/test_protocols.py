"""Evaluation protocols: presets, overrides, per-seed test passes and the results files."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin, get_type_hints

import pytest
import torch
from fixtures_data import pascal
from test_segment import tiny_args

from datamodules import CocoDataset, CocoFewShot, PascalDataset
from datamodules.bounds import PositiveInt
from datamodules.datamodule import FewShotDataModule
from datamodules.protocols import OPTIONS, PROTOCOLS, Protocol, ProtocolName, resolve_protocol
from tasks.callbacks import results
from tasks.report import main as report_main
from tasks.segment import main

BAM_SEEDS = [510, 365, 382, 322, 988]


@pytest.mark.parametrize(
    ("name", "family", "expected"),
    [
        ("pfenet", "pascal", (5000, True, [321], "floor8", 473, "black", "square", False)),
        ("pfenet", "coco", (20000, True, [321], "floor8", 473, "black", "square", False)),
        ("asgnet", "pascal", (1000, True, [321], "floor8", 473, "black", "square", False)),
        ("asgnet", "coco", (20000, True, [321], "floor8", 473, "black", "square", False)),
        ("hsnet", "pascal", (1000, False, [0], "squash", 400, "mean", "input", False)),
        ("hsnet", "coco", (1000, False, [0], "squash", 400, "mean", "input", False)),
        ("bam", "pascal", (1000, False, BAM_SEEDS, "floor8", 473, "black", "square", True)),
        ("clean", "pascal", (1000, False, [321], "longer_pad", 473, "mean", "original", False)),
        (None, "coco", (1000, False, [321], "longer_pad", 473, "mean", "original", False)),
    ],
)
def test_presets_resolve_to_the_documented_values(name, family, expected) -> None:
    resolved = resolve_protocol(name, family, {}, image_size=473)
    keys = ("test_episodes", "extra_test_episode", "test_seeds", "eval_resize", "eval_size")
    keys += ("eval_pad", "scoring", "exclude_novel_from_train")
    assert tuple(resolved[k] for k in keys) == expected
    assert resolved["name"] == (name or "clean") and resolved["overridden"] == []


def test_explicit_options_override_a_preset_and_are_recorded() -> None:
    explicit = {"test_episodes": 200, "test_seeds": 3, "eval_size": None, "scoring": "original"}
    resolved = resolve_protocol("hsnet", "pascal", explicit, image_size=64)
    assert resolved["test_episodes"] == 200
    assert resolved["test_seeds"] == [0, 1, 2]  # a count: the preset's first seed onwards
    assert resolved["eval_size"] == 400 and resolved["eval_resize"] == "squash"
    assert resolved["scoring"] == "original"
    assert resolved["overridden"] == ["scoring", "test_episodes", "test_seeds"]


@pytest.mark.parametrize(
    ("name", "explicit", "message"),
    [
        ("pfenet5", {}, r"data.protocol='pfenet5': expected one of \['asgnet', 'bam', 'clean'"),
        ("pfenet", {"test_seeds": 0}, r"data.test_seeds=0: expected a count >= 1"),
        ("pfenet", {"test_seeds": [1, 1]}, r"data.test_seeds=\[1, 1\]: expected .* distinct"),
    ],
)
def test_bad_protocol_options_are_named(name, explicit, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_protocol(name, "pascal", explicit, image_size=64)


def test_datamodules_pick_their_dataset_column(pascal_root: Path, tmp_path: Path) -> None:
    assert pascal(pascal_root, tmp_path, protocol="pfenet").protocol["test_episodes"] == 5000
    coco = CocoFewShot(root=str(tmp_path), protocol="pfenet", cache_dir=str(tmp_path))
    assert coco.protocol["test_episodes"] == 20000


def test_seeds_change_the_episodes_but_not_the_protocol(pascal_root: Path, tmp_path) -> None:
    dm = pascal(pascal_root, tmp_path, test_episodes=12, test_seeds=[7, 8])
    dm.setup("test")
    loaders = dm.test_dataloader()
    episodes = [loader.sampler.episodes() for loader in loaders]
    assert len(loaders) == 2 and episodes[0] != episodes[1]
    assert [len(e) for e in episodes] == [12, 12]
    alone = pascal(pascal_root, tmp_path, test_episodes=12, test_seeds=[8])
    alone.setup("test")
    assert alone.test_dataloader()[0].sampler.episodes() == episodes[1]
    for loader in loaders:
        assert loader.dataset.evaluation == loaders[0].dataset.evaluation


def test_hsnet_squashes_and_scores_at_the_input_size(pascal_root: Path, tmp_path: Path) -> None:
    dm = pascal(pascal_root, tmp_path, protocol="hsnet", eval_size=48, test_episodes=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["query_image"].shape[-2:] == (48, 48)
    assert torch.equal(batch["query_label"], batch["query_mask"])
    assert batch["query_size"].tolist() == batch["query_valid"].tolist() == [[48, 48]] * 4
    pfenet = pascal(pascal_root, tmp_path, protocol="pfenet", test_episodes=4)
    pfenet.setup("test")
    batch = next(iter(pfenet.test_dataloader()[0]))
    assert batch["query_label"].shape[-2:] != (64, 64)  # the original labels, not the input


@pytest.mark.slow
def test_multi_seed_test_writes_results_that_match_single_seed_runs(tmp_path: Path) -> None:
    """Each seed's score equals a separate single-seed test; the summary is their mean and
    sample std; the report tabulates the file."""
    limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    main(["fit", *tiny_args(tmp_path), *limits])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "results"
    test = ["test", *tiny_args(tmp_path), "--ckpt_path", str(checkpoint), "--results.output_dir"]
    main([*test, str(out / "both"), "--data.test_seeds", "[3, 4]"])
    main([*test, str(out / "single"), "--data.test_seeds", "[4]"])
    (both,) = (out / "both").glob("*.results.json")
    (single,) = (out / "single").glob("*.results.json")
    assert both.name == "last.ShapesDataset-fold0-1shot-clean.results.json"
    result, alone = json.loads(both.read_text()), json.loads(single.read_text())
    assert result["seeds"] == [3, 4] and result["protocol"]["test_seeds"] == [3, 4]
    assert result["per_seed"][1] == alone["per_seed"][0]
    mious = torch.tensor([run["miou"] for run in result["per_seed"]], dtype=torch.float64)
    assert result["summary"]["miou_mean"] == pytest.approx(mious.mean().item())
    assert result["summary"]["miou_std"] == pytest.approx(mious.std().item())
    assert result["checkpoint"]["path"] == str(checkpoint)
    assert len(result["checkpoint"]["sha256"]) == 64
    assert result["provenance"]["version"] and result["backbone_label"].startswith("resnet18")
    assert both.with_suffix(".csv").read_text().startswith("seed,miou,fbiou,")
    report_main([str(out / "both"), "--csv", str(out / "table.csv")])
    assert (out / "table.csv").read_text().count("\n") == 2
    tables = sorted((tmp_path / "runs" / "wandb").rglob("test/results_*.table.json"))
    logged = [json.loads(table.read_text()) for table in tables]  # W&B offline, read back
    assert [row[0] for row in logged[0]["data"]] == ["3", "4", "mean", "std"]
    assert logged[0]["data"][0][1] == pytest.approx(result["per_seed"][0]["miou"])


def test_results_folder_that_cannot_be_written_fails_before_testing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"cannot write test results to .*--results"):
        main(["test", *tiny_args(tmp_path), "--untrained", "allow",
              "--results.output_dir", str(blocker / "sub")])  # fmt: skip


def test_protocol_names_type_lists_every_preset() -> None:
    """``--data.protocol`` is checked by its type when the command line is parsed."""
    assert get_args(ProtocolName) == tuple(PROTOCOLS)


def _members(annotation: object) -> set:
    """A union's alternatives; a per-family ``dict[str, X]`` stands for ``X``."""
    members = (
        set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    )
    return {get_args(m)[1] if get_origin(m) is dict else m for m in members} - {type(None)}


def test_each_protocol_option_is_defined_once_and_exposed_with_its_type_and_doc() -> None:
    """A :class:`Protocol` field is the option: ``OPTIONS`` is derived from the fields, and the
    class that takes the option (the shared datamodule, or the PASCAL dataset's ``train_list``
    and the COCO dataset's ``coco_crowd``) has it as an argument of the field's type (``None``:
    the preset's value) and documents it; nothing else lists the options."""
    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    assert set(OPTIONS) == set(fields) - {"source"}
    for option in OPTIONS:
        owner = next(
            cls for cls in (FewShotDataModule, PascalDataset, CocoDataset)
            if option in inspect.signature(cls.__init__).parameters
        )  # fmt: skip
        hints = get_type_hints(owner.__init__, include_extras=True)
        given = _members(hints[option])
        expected = _members(get_type_hints(Protocol, include_extras=True)[option])
        if option == "test_seeds":  # a list of seeds, or their count
            expected = {list[int], PositiveInt}
        assert given == expected, (option, given, expected)
        assert f"        {option}: " in owner.__doc__, (
            f"{owner.__name__} does not document {option}"
        )


def test_the_summary_title_and_path_are_never_broken_mid_word(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A narrow terminal or a file (23 columns): the title and the results path each stay one
    line; only the three-column table is laid out to the width."""
    monkeypatch.setenv("COLUMNS", "23")
    result = {
        "method": "PrototypeHead",
        "backbone_label": "resnet18-standard-os8-contracted",
        "dataset": "ShapesDataset",
        "fold": 0,
        "shots": 1,
        "protocol": {"name": "clean"},
    }
    path = Path("runs/fewshot-dilated/abc123/last.ShapesDataset-fold0-1shot-clean.results.json")
    columns = ["seed", "miou", "fbiou"]
    results.TestResults.print_table(result, columns, [["321", 0.5, 0.7], ["mean", 0.5, 0.7]], path)
    lines = capsys.readouterr().out.splitlines()
    title = ("PrototypeHead resnet18-standard-os8-contracted, ShapesDataset fold 0, 1-shot, "
             "protocol clean")  # fmt: skip
    assert lines[0] == title and lines[-1] == f"written to {path}"
    assert all(len(line) <= 23 for line in lines[1:-1]), lines
