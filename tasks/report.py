"""Few-shot segmentation result tables: ``python -m tasks.report RESULTS... [--markdown OUT.md]
[--csv OUT.csv] [--compare]``.

Papers report one row per method and backbone with the mIoU of folds 0-3 and their mean, often
with FB-IoU beside it (PFENet, Tian et al., TPAMI 2020, Tables 1-2; HSNet, Min et al., ICCV 2021,
Tables 1-2). This command builds that table from the ``*.results.json`` files the test command
writes, one file per (method, backbone, dataset, fold, shots); folders are searched recursively.

A result file is a JSON object with ``format: "fewshot-dilated/test-results"``,
``format_version: 1``, ``method``, ``backbone_label``, ``dataset``, ``fold`` (0-3), ``shots``,
``protocol`` (an object with at least ``name``), ``seeds`` and ``summary`` with ``miou_mean``,
``miou_std`` (sample standard deviation over seeds) and ``fbiou_mean``, all fractions in [0, 1].

Rules:

* A row is one (method, backbone_label, dataset, shots, protocol name). Its files must have equal
  ``protocol`` objects (a preset with an option overridden is not the preset): numbers measured
  differently are not averaged into one mean. The Protocol column shows each row's name.
* ``--compare`` prints instead what each protocol makes of the same checkpoint: one row per
  (checkpoint, dataset, fold, shots), one column per protocol (the clean protocol first), each
  cell the mIoU and its difference from the clean protocol's: what a paper's quirks are worth.
* Two files for the same fold of a row are refused: which one belongs in the table is the user's
  choice, not the report's.
* Cells are percent with one decimal, ``mean ± std`` over seeds when a fold has several, ``–``
  for a missing fold. Mean and FB-IoU average the folds present, marked ``*`` when fewer than four.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

FORMAT = "fewshot-dilated/test-results"
FORMAT_VERSIONS = (1,)
PATTERN = "*.results.json"
FOLDS = 4
FOOTNOTE = "`*` mean over the folds present"

Result = tuple[Path, dict[str, Any]]


class ReportError(ValueError):
    """A result file or a combination of them that cannot go into the table."""


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


# Checked in this order, so a file of another format is reported as such, not as a missing field.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (lambda v: v in FORMAT_VERSIONS, f"one of {list(FORMAT_VERSIONS)}"),
    "method": (_text, "a non-empty string"),
    "backbone_label": (_text, "a non-empty string"),
    "dataset": (_text, "a non-empty string"),
    "fold": (lambda v: _integer(v) and 0 <= v < FOLDS, f"an integer 0-{FOLDS - 1}"),
    "shots": (lambda v: _integer(v) and v > 0, "an integer > 0"),
    "protocol": (lambda v: isinstance(v, dict), "an object"),
    "protocol.name": (_text, "a non-empty string"),
    "seeds": (lambda v: isinstance(v, list) and bool(v), "a non-empty list"),
    "summary.miou_mean": (_fraction, "a fraction in [0, 1]"),
    "summary.miou_std": (_fraction, "a fraction in [0, 1]"),
    "summary.fbiou_mean": (_fraction, "a fraction in [0, 1]"),
}


def load_result(path: str | Path) -> dict[str, Any]:
    """Read and validate one result file, so that a bad file is named before any table is built."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReportError(f"{path}: cannot read the file ({error.strerror or error})") from error
    except ValueError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for field, (valid, expected) in FIELDS.items():
        value: Any = data
        for key in field.split("."):
            if not isinstance(value, dict) or key not in value:
                raise ReportError(f"{path}: missing field {field!r} (expected {expected})")
            value = value[key]
        if not valid(value):
            raise ReportError(f"{path}: field {field!r} is {value!r}, expected {expected}")
    return data


def collect(paths: Iterable[str | Path]) -> list[Result]:
    """Load the given files and every ``*.results.json`` under the given folders, each file once."""
    paths = [Path(p) for p in paths]
    files: dict[Path, Path] = {}
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob(PATTERN))
        elif path.is_file():
            found = [path]
        else:
            raise ReportError(f"{path}: no such file or folder")
        for file in found:
            files.setdefault(file.resolve(), file)
    if not files:
        names = ", ".join(str(p) for p in paths)
        raise ReportError(f"no {PATTERN} files found under {names}")
    return [(file, load_result(file)) for file in files.values()]


@dataclass(frozen=True)
class Row:
    """One table row; numbers are percent, per fold ``None`` (or 0 seeds) where it is missing."""

    method: str
    backbone: str
    dataset: str
    shots: int
    protocol: str
    miou: tuple[float | None, ...]
    std: tuple[float | None, ...]
    seeds: tuple[int, ...]
    mean: float
    fbiou: float

    @property
    def folds(self) -> int:
        return sum(m is not None for m in self.miou)


RowKey = tuple[str, str, str, int, str]


def _describe(key: RowKey) -> str:
    method, backbone, dataset, shots, protocol = key
    return f"{method} / {backbone} / {dataset} / {shots}-shot / {protocol}"


def _check_protocol(key: RowKey, first: Result, other: Result) -> None:
    """Refuse to average numbers measured under different protocols into one mean."""
    (path_a, a), (path_b, b) = first, other
    pa, pb = a["protocol"], b["protocol"]
    missing = "<missing>"
    diffs = [
        f"{k}: {pa.get(k, missing)!r} vs {pb.get(k, missing)!r}"
        for k in sorted(pa.keys() | pb.keys())
        if pa.get(k, missing) != pb.get(k, missing)
    ]
    if diffs:
        raise ReportError(
            f"different protocols in one row ({_describe(key)}): {path_a} and {path_b} differ in "
            + "; ".join(diffs)
        )


def _row(key: RowKey, folds: dict[int, Result]) -> Row:
    summaries = [folds[f][1]["summary"] if f in folds else None for f in range(FOLDS)]
    present = [s for s in summaries if s is not None]
    return Row(
        *key,
        miou=tuple(None if s is None else 100 * s["miou_mean"] for s in summaries),
        std=tuple(None if s is None else 100 * s["miou_std"] for s in summaries),
        seeds=tuple(len(folds[f][1]["seeds"]) if f in folds else 0 for f in range(FOLDS)),
        mean=100 * statistics.fmean(s["miou_mean"] for s in present),
        fbiou=100 * statistics.fmean(s["fbiou_mean"] for s in present),
    )


def build_table(results: Iterable[Result]) -> list[Row]:
    """Group results into rows, refusing mixed protocols and duplicate folds within a row."""
    groups: dict[RowKey, dict[int, Result]] = {}
    for path, data in results:
        key = (
            data["method"],
            data["backbone_label"],
            data["dataset"],
            data["shots"],
            data["protocol"]["name"],
        )
        folds = groups.setdefault(key, {})
        fold = data["fold"]
        if fold in folds:
            raise ReportError(
                f"two results for fold {fold} of {_describe(key)}: {folds[fold][0]} and {path}; "
                "pass only the one that belongs in the table"
            )
        if folds:
            _check_protocol(key, next(iter(folds.values())), (path, data))
        folds[fold] = (path, data)
    rows = [_row(key, folds) for key, folds in groups.items()]
    return sorted(rows, key=lambda r: (r.dataset, r.shots, r.method, r.backbone, r.protocol))


def _checkpoint(data: dict[str, Any]) -> str:
    checkpoint = data.get("checkpoint") or {}
    if "sha256" not in checkpoint:
        raise ReportError("--compare needs result files with their checkpoint's sha256")
    return f"{Path(checkpoint['path']).name} ({checkpoint['sha256'][:8]})"


def compare_protocols(results: Iterable[Result]) -> str:
    """The ``--compare`` table as Markdown: one checkpoint under every protocol it was tested
    with, each cell ``mIoU (difference from clean)`` in percent."""
    cells: dict[tuple[str, str, int, int], dict[str, float]] = {}
    names: set[str] = set()
    for path, data in results:
        key = (_checkpoint(data), data["dataset"], data["fold"], data["shots"])
        name = data["protocol"]["name"]
        if name in cells.setdefault(key, {}):
            raise ReportError(
                f"two {name!r} results for {key[0]} fold {key[2]}: {path} and another"
            )
        cells[key][name] = 100 * data["summary"]["miou_mean"]
        names.add(name)
    columns = sorted(names, key=lambda n: (n != "clean", n))
    lines = [
        "| Checkpoint | Dataset | Fold | Shots | " + " | ".join(columns) + " |",
        "| :--- | :--- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for key in sorted(cells):
        row = cells[key]
        clean = row.get("clean")
        texts = []
        for name in columns:
            if name not in row:
                texts.append("–")
            elif clean is None or name == "clean":
                texts.append(f"{row[name]:.1f}")
            else:
                texts.append(f"{row[name]:.1f} ({row[name] - clean:+.1f})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def _cells(row: Row) -> list[str]:
    partial = "*" if row.folds < FOLDS else ""
    folds = [
        "–" if m is None else f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}"
        for m, s, n in zip(row.miou, row.std, row.seeds, strict=True)
    ]
    text = [row.method, row.backbone, row.dataset, str(row.shots), row.protocol]
    return [*text, *folds, f"{row.mean:.1f}{partial}", f"{row.fbiou:.1f}{partial}"]


def to_markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown, padded so that it also reads well in a terminal."""
    header = ["Method", "Backbone", "Dataset", "Shots", "Protocol"]
    header += [f"Fold {f}" for f in range(FOLDS)] + ["Mean", "FB-IoU"]
    body = [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1, 2, 4}
    rule = [":" + "-" * (w - 1) if i in left else "-" * (w - 1) + ":" for i, w in enumerate(widths)]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    text = "\n".join(line(cells) for cells in [header, rule, *body]) + "\n"
    if any(row.folds < FOLDS for row in rows):
        text += f"\n{FOOTNOTE}\n"
    return text


def to_csv(rows: Sequence[Row], file: TextIO) -> None:
    """The table as numbers (percent, empty where a fold is missing) for plots and spreadsheets."""
    fields = ["method", "backbone", "dataset", "shots", "protocol"]
    fields += [f"fold{f}" for f in range(FOLDS)] + [f"fold{f}_std" for f in range(FOLDS)]
    fields += ["mean", "fbiou", "folds", "seeds"]
    writer = csv.writer(file)
    writer.writerow(fields)
    for r in rows:
        numbers = ["" if v is None else round(v, 4) for v in (*r.miou, *r.std, r.mean, r.fbiou)]
        text = [r.method, r.backbone, r.dataset, r.shots, r.protocol]
        writer.writerow([*text, *numbers, r.folds, max(r.seeds)])


def main(argv: list[str] | None = None) -> None:
    """Print the table; a bad or inconsistent input exits with status 2 and the reason."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.report",
        description="Aggregate few-shot segmentation *.results.json files into a fold table.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="RESULTS", help="result files or folders to search"
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="OUT.md", help="also write the table to this file"
    )
    parser.add_argument(
        "--csv", type=Path, metavar="OUT.csv", help="also write the numbers to this CSV file"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="one row per checkpoint, one column per protocol (differences from clean)",
    )
    args = parser.parse_args(argv)
    try:
        results = collect(args.paths)
        rows = build_table(results)
        markdown = compare_protocols(results) if args.compare else to_markdown(rows)
    except ReportError as error:
        parser.error(str(error))
    sys.stdout.write(markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown, encoding="utf-8")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="", encoding="utf-8") as file:
            to_csv(rows, file)


if __name__ == "__main__":
    main()
