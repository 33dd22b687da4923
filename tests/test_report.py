"""The result table of :mod:`tasks.report`, built from hand-written result files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks.report import ReportError, build_table, collect, load_result, main, to_markdown

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = {
    "name": "pfenet",
    "test_episodes": 5000,
    "test_seeds": [321],
    "eval_resize": "longer_pad",
    "eval_size": 473,
    "scoring": "original",
    "exclude_novel_from_train": False,
    "min_pixels": 2048,
}


def write_result(
    folder: Path,
    fold: int,
    miou: float,
    *,
    method: str = "ASGNetHead",
    shots: int = 1,
    fbiou: float = 0.7,
    seeds: int = 1,
    std: float = 0.0,
    protocol: dict[str, Any] | None = None,
    name: str | None = None,
    **overrides: Any,
) -> Path:
    """Write one result file as the test command does; ``overrides`` replace top-level fields."""
    data = {
        "format": "fewshot-dilated/test-results",
        "format_version": 1,
        "method": method,
        "backbone": {"arch": "resnet50", "stem": "deep", "output_stride": 8},
        "backbone_label": "resnet50-deep-os8",
        "dataset": "PascalFewShot",
        "fold": fold,
        "shots": shots,
        "protocol": protocol or PROTOCOL,
        "seeds": list(range(321, 321 + seeds)),
        "per_seed": [],
        "summary": {"miou_mean": miou, "miou_std": std, "fbiou_mean": fbiou, "fbiou_std": 0.0},
        "checkpoint": None,
        "provenance": {"version": "0.1.0"},
    } | overrides
    path = folder / (name or f"{method}-fold{fold}-{shots}shot.results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_folds(folder: Path, mious: list[float], fbious: list[float], **kwargs: Any) -> None:
    for fold, (miou, fbiou) in enumerate(zip(mious, fbious, strict=True)):
        write_result(folder, fold, miou, fbiou=fbiou, **kwargs)


def cells(markdown: str) -> list[list[str]]:
    """The table's body cells, stripped of padding."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_table_of_two_methods_one_and_five_shot(tmp_path: Path) -> None:
    write_folds(tmp_path, [0.6, 0.62, 0.64, 0.66], [0.7, 0.72, 0.74, 0.76])  # mean 63.0, FB 73.0
    write_folds(tmp_path, [0.5, 0.5, 0.55, 0.65], [0.7, 0.7, 0.7, 0.7], method="PFENetHead")
    write_folds(tmp_path, [0.7, 0.7, 0.7, 0.7], [0.8, 0.8, 0.8, 0.8], shots=5)
    write_folds(tmp_path, [0.6, 0.6, 0.6, 0.6], [0.8, 0.8, 0.8, 0.9], method="PFENetHead", shots=5)
    expected = """\
| Method     | Backbone          | Dataset       | Shots | Protocol | Fold 0 | Fold 1 | Fold 2 | Fold 3 | Mean | FB-IoU |
| :--------- | :---------------- | :------------ | ----: | :------- | -----: | -----: | -----: | -----: | ---: | -----: |
| ASGNetHead | resnet50-deep-os8 | PascalFewShot |     1 | pfenet   |   60.0 |   62.0 |   64.0 |   66.0 | 63.0 |   73.0 |
| PFENetHead | resnet50-deep-os8 | PascalFewShot |     1 | pfenet   |   50.0 |   50.0 |   55.0 |   65.0 | 55.0 |   70.0 |
| ASGNetHead | resnet50-deep-os8 | PascalFewShot |     5 | pfenet   |   70.0 |   70.0 |   70.0 |   70.0 | 70.0 |   80.0 |
| PFENetHead | resnet50-deep-os8 | PascalFewShot |     5 | pfenet   |   60.0 |   60.0 |   60.0 |   60.0 | 60.0 |   82.5 |
"""  # noqa: E501
    assert to_markdown(build_table(collect([tmp_path]))) == expected


def test_several_seeds_show_their_std(tmp_path: Path) -> None:
    write_result(tmp_path, 0, 0.608, seeds=3, std=0.004)
    write_result(tmp_path, 1, 0.6, seeds=1)
    row = cells(to_markdown(build_table(collect([tmp_path]))))[0]
    assert row[5:7] == ["60.8 ± 0.4", "60.0"]


def test_missing_fold_is_a_dash_and_the_mean_is_marked(tmp_path: Path) -> None:
    for fold, miou in [(0, 0.6), (1, 0.62), (3, 0.67)]:
        write_result(tmp_path, fold, miou)
    markdown = to_markdown(build_table(collect([tmp_path])))
    assert cells(markdown)[0][5:] == ["60.0", "62.0", "–", "67.0", "63.0*", "70.0*"]
    assert markdown.endswith("\n`*` mean over the folds present\n")


def test_mixed_protocols_in_one_row_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_result(tmp_path, 0, 0.6)
    second = write_result(tmp_path, 1, 0.6, protocol=PROTOCOL | {"test_episodes": 1000})
    with pytest.raises(SystemExit) as exit_info:
        main([str(first), str(second)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(first) in error and str(second) in error
    assert "test_episodes: 5000 vs 1000" in error


def test_different_protocols_in_different_rows_are_fine(tmp_path: Path) -> None:
    write_result(tmp_path, 0, 0.6)
    write_result(tmp_path, 0, 0.6, shots=5, protocol=PROTOCOL | {"name": "hsnet"})
    assert [row.protocol for row in build_table(collect([tmp_path]))] == ["pfenet", "hsnet"]


def test_two_results_for_one_fold_are_refused(tmp_path: Path) -> None:
    first = write_result(tmp_path, 2, 0.6, name="a.results.json")
    second = write_result(tmp_path, 2, 0.61, name="b.results.json")
    with pytest.raises(ReportError, match="fold 2") as error:
        build_table(collect([tmp_path]))
    assert str(first) in str(error.value) and str(second) in str(error.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else", "format_version": 1}', "'format'"),
        ('{"format": "fewshot-dilated/test-results", "format_version": 9}', "'format_version'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.results.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=message) as error:
        load_result(path)
    assert str(path) in str(error.value)


def test_missing_and_invalid_fields_are_named(tmp_path: Path) -> None:
    path = write_result(tmp_path, 0, 0.6)
    data = json.loads(path.read_text())
    del data["summary"]["fbiou_mean"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"missing field 'summary.fbiou_mean'") as error:
        load_result(path)
    assert str(path) in str(error.value)
    percent = write_result(tmp_path, 1, 60.8)
    with pytest.raises(ReportError, match=r"'summary.miou_mean' is 60.8, expected a fraction"):
        load_result(percent)


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert f"no *.results.json files found under {tmp_path / 'empty'}" in capsys.readouterr().err
    bad = tmp_path / "bad.results.json"
    bad.write_text("{")
    with pytest.raises(SystemExit):
        main([str(bad)])
    assert str(bad) in capsys.readouterr().err


def test_folders_are_searched_recursively_and_csv_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    write_result(runs / "a" / "deep", 0, 0.6, seeds=2, std=0.01)
    write_result(runs / "b", 1, 0.7, fbiou=0.8)
    (runs / "b" / "notes.json").write_text("{not a result")
    out = tmp_path / "out"
    main([str(runs), "--csv", str(out / "table.csv"), "--markdown", str(out / "table.md")])
    assert (out / "table.md").read_text() == capsys.readouterr().out
    with (out / "table.csv").open(newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert row["method"] == "ASGNetHead" and row["shots"] == "1" and row["protocol"] == "pfenet"
    assert [row[f"fold{f}"] for f in range(4)] == ["60.0", "70.0", "", ""]
    assert [row[f"fold{f}_std"] for f in range(4)] == ["1.0", "0.0", "", ""]
    assert float(row["mean"]) == pytest.approx(65.0)
    assert float(row["fbiou"]) == pytest.approx(75.0)
    assert (row["folds"], row["seeds"]) == ("2", "2")


def test_module_runs_as_a_command(tmp_path: Path) -> None:
    write_folds(tmp_path / "results", [0.6, 0.62, 0.64, 0.66], [0.7, 0.72, 0.74, 0.76])
    result = subprocess.run(
        [sys.executable, "-m", "tasks.report", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| ASGNetHead | resnet50-deep-os8 | PascalFewShot |" in result.stdout
    assert "| 63.0 |" in result.stdout


def test_one_checkpoint_under_several_protocols_sits_side_by_side(tmp_path: Path) -> None:
    """Same method, shots and fold under two presets: two rows, and ``--compare`` one row."""
    checkpoint = {"path": "/runs/best.ckpt", "sha256": "ab" * 32}
    for name, miou in (("clean", 0.5), ("pfenet", 0.513), ("hsnet", 0.47)):
        write_result(tmp_path, 0, miou, protocol=PROTOCOL | {"name": name}, checkpoint=checkpoint,
                     name=f"{name}.results.json")  # fmt: skip
    assert [row.protocol for row in build_table(collect([tmp_path]))] == [
        "clean",
        "hsnet",
        "pfenet",
    ]
    out = tmp_path / "compare.md"
    main([str(tmp_path), "--compare", "--markdown", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == "| Checkpoint | Dataset | Fold | Shots | clean | hsnet | pfenet |"
    assert (
        lines[2]
        == "| best.ckpt (abababab) | PascalFewShot | 0 | 1 | 50.0 | 47.0 (-3.0) | 51.3 (+1.3) |"
    )


def test_compare_needs_the_checkpoint_of_each_result(tmp_path: Path, capsys) -> None:
    write_result(tmp_path, 0, 0.5)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--compare"])
    assert "checkpoint's sha256" in capsys.readouterr().err
