"""Predictions never overwrite inputs or each other (``tasks.callbacks.predictions``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.callbacks.predictions import MaskWriter, check_apart, output_names


def queries(tmp_path: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = tmp_path / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_repeated_file_names_keep_their_folders(tmp_path: Path) -> None:
    unique = queries(tmp_path, "a/1.jpg", "b/2.jpg")
    assert output_names(unique) == {str(unique[0]): "1", str(unique[1]): "2"}
    repeated = queries(tmp_path, "a/1.jpg", "b/1.jpg", "b/c/1.png")
    assert list(output_names(repeated).values()) == ["a/1", "b/1", "b/c/1"]


def test_writer_writes_every_repeated_name_once(tmp_path: Path) -> None:
    paths = queries(tmp_path, "a/1.jpg", "b/1.jpg")
    writer = MaskWriter(str(tmp_path / "out"))
    writer.names = output_names(paths)
    masks = [torch.zeros(6, 8, dtype=torch.uint8), torch.ones(6, 8, dtype=torch.uint8)]
    prediction = {"query_id": ["1", "1"], "query_path": [str(p) for p in paths], "masks": masks}
    writer.write_on_batch_end(None, None, prediction, None, None, 0)  # type: ignore[arg-type]
    for folder, value in (("a", 0), ("b", 1)):
        mask = np.array(Image.open(tmp_path / "out" / folder / "1.png"))
        assert mask.shape == (6, 8) and (mask == value).all()
        assert (tmp_path / "out" / folder / "1_overlay.jpg").is_file()


@pytest.mark.parametrize("output", ["inputs", "inputs/a"], ids=["query-folder", "subfolder"])
def test_output_folder_holding_queries_is_refused(tmp_path: Path, output: str) -> None:
    """The queries' own folder, and one where the kept relative names land in a query folder
    (``inputs/a`` + ``a/1`` is fine, + ``1`` is ``inputs/a/1.png`` beside ``inputs/a/1.jpg``)."""
    paths = queries(tmp_path, "a/1.jpg", "1.jpg")
    names = output_names(paths)
    with pytest.raises(ValueError, match=r"holds predict queries; choose a folder apart"):
        check_apart(tmp_path / output, paths, names)
    check_apart(tmp_path / "elsewhere", paths, names)
