"""Files the data modules read and write: list lines of every published form, caches and
generated sets in folders that cannot be written, and writes that run out of storage (a real
subprocess under ``RLIMIT_FSIZE``, the one storage limit a test can set without a device)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures_data import write_pascal_tree

from datamodules.files import write_once
from datamodules.index import class_counts, index_path
from datamodules.pascal import pascal_source
from datamodules.shapes import ensure_shapes

REPO = Path(__file__).resolve().parents[1]
LIST = "ImageSets/Segmentation/own.txt"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small VOC tree: ids ``2008_train0000..1`` and ``2008_test0000..1``."""
    return write_pascal_tree(tmp_path / "VOC2012", num_train=2, num_test=2)


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A file where a folder is wanted: unwritable even for root."""
    path = tmp_path / "blocker"
    path.write_text("")
    return path


def read_list(root: Path, *lines: str, data: bytes | None = None):
    list_file = root / LIST
    list_file.write_bytes(data if data is not None else "".join(f"{x}\n" for x in lines).encode())
    return pascal_source(root, LIST, "pascal-own")


def rename(root: Path, image_id: str, new_id: str) -> None:
    for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png")):
        (root / folder / f"{image_id}{suffix}").rename(root / folder / f"{new_id}{suffix}")


# List lines ------------------------------------------------------------------------------------


def test_absolute_list_paths_are_used_as_they_are(tree: Path, tmp_path: Path) -> None:
    """PFENet joins list fields to its data root with os.path.join: an absolute path wins."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image, label = elsewhere / "far.jpg", elsewhere / "far.png"
    (tree / "JPEGImages/2008_test0000.jpg").rename(image)
    (tree / "SegmentationClassAug/2008_test0000.png").rename(label)
    source = read_list(
        tree,
        f"{image} {label}",
        "/JPEGImages/2008_test0001.jpg /SegmentationClassAug/2008_test0001.png",
    )
    assert source.ids == ["far", "2008_test0001"]
    assert source.image_path("far") == image and source.label_origin("far") == str(label)
    # a leading "/" that is no existing path stays relative to the root
    assert source.image_path("2008_test0001") == tree / "JPEGImages/2008_test0001.jpg"
    assert source.fingerprint()  # every listed file exists


def test_ids_with_spaces_name_their_files(tree: Path) -> None:
    rename(tree, "2008_test0000", "2008 test0000")
    source = read_list(tree, "2008 test0000", "2008_test0001")
    assert source.ids == ["2008 test0000", "2008_test0001"]
    assert source.image_path("2008 test0000") == tree / "JPEGImages/2008 test0000.jpg"
    assert source.class_pixels("2008 test0000")


def test_path_pairs_with_spaces_split_at_the_image_suffix(tree: Path) -> None:
    rename(tree, "2008_test0000", "a b")
    rename(tree, "2008_test0001", "c  d")
    source = read_list(
        tree,
        "JPEGImages/a b.jpg SegmentationClassAug/a b.png",
        "  JPEGImages/c  d.jpg\tSegmentationClassAug/c  d.png  ",
    )
    assert source.ids == ["a b", "c  d"]
    assert source.label_origin("c  d") == str(tree / "SegmentationClassAug/c  d.png")
    assert source.fingerprint()


def test_a_list_saved_with_a_bom_and_crlf_reads_the_same(tree: Path) -> None:
    lines = ["2008_test0000", "JPEGImages/2008_test0001.jpg SegmentationClassAug/2008_test0001.png"]
    plain = read_list(tree, *lines)
    windows = read_list(tree, data=b"\xef\xbb\xbf" + "\r\n".join([*lines, ""]).encode())
    assert windows.ids == plain.ids == ["2008_test0000", "2008_test0001"]
    assert [windows.image_path(i) for i in windows.ids] == [plain.image_path(i) for i in plain.ids]


@pytest.mark.parametrize(
    "line",
    [
        "2008_test0001 2008_test0000",  # two ids
        "JPEGImages/2008_test0001.jpg SegmentationClassAug/2008_test0001.jpg",  # label not .png
        "2008 nothing",  # an id with a space but no image
    ],
)
def test_a_malformed_list_line_names_the_file_the_line_and_the_forms(tree: Path, line: str) -> None:
    with pytest.raises(ValueError) as error:
        read_list(tree, "2008_test0000", line)
    message = str(error.value)
    assert message.startswith(f"{tree / LIST}:2: ")
    assert "image id" in message and "image path and a .png label path" in message
    assert repr(line) in message


def test_a_listed_id_without_files_is_named_when_indexed(tree: Path) -> None:
    source = read_list(tree, "2008_test0000", "2008_gone")
    with pytest.raises(FileNotFoundError, match=r"'2008_gone' not found: .*2008_gone\.jpg"):
        source.fingerprint()


# Folders that cannot be written ----------------------------------------------------------------


def test_an_unwritable_index_cache_warns_once_and_indexes(
    tree: Path, tmp_path: Path, blocker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = pascal_source(tree, "ImageSets/Segmentation/val.txt", "pascal-test")
    expected = class_counts(source, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        assert class_counts(source, blocker / "cache") == expected
        assert class_counts(source, blocker / "cache") == expected  # prepare_data, then setup
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    cache = index_path(source, blocker / "cache")
    assert warnings[0].startswith(f"class index cache {cache} not writable (")
    assert "pass a writable --data.cache_dir" in warnings[0]


def test_an_index_cache_in_a_read_only_folder_is_read(
    tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Read, not rewritten (as root the mode blocks nothing; the unchanged inode shows it)."""
    source = pascal_source(tree, "ImageSets/Segmentation/val.txt", "pascal-test")
    expected = class_counts(source, tmp_path / "cache")
    cache = index_path(source, tmp_path / "cache")
    inode = cache.stat().st_ino
    (tmp_path / "cache").chmod(0o555)
    try:
        with caplog.at_level("WARNING"):
            assert class_counts(source, tmp_path / "cache") == expected
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert not caplog.records and cache.stat().st_ino == inode


def test_generated_shapes_under_an_unwritable_root_name_the_folder_and_option(
    blocker: Path,
) -> None:
    with pytest.raises(PermissionError) as error:
        ensure_shapes(blocker / "shapes", 4, 4, 0)
    message = str(error.value)
    assert message.startswith(f"cannot write generated data to '{blocker / 'shapes'}/v")
    assert "pass a writable --data.root (or set FEWSHOT_DATA_DIR)" in message
    assert isinstance(error.value.__cause__, OSError)


def test_a_failed_write_into_the_folder_names_it(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        (folder / "train").write_text("a file where the writer wants a folder")
        (folder / "train" / "0.png").write_bytes(b"")

    with pytest.raises(PermissionError, match=rf"cannot write generated data to '{tmp_path}/set'"):
        write_once(tmp_path / "set", write)
    assert os.listdir(tmp_path) == []  # no partial folder left


def test_a_folder_written_by_a_concurrent_process_wins(tmp_path: Path) -> None:
    folder = tmp_path / "set"

    def write(partial: Path) -> None:
        (partial / "mine").write_text("")
        folder.mkdir()  # the other process renames its folder in first
        (folder / "theirs").write_text("")

    assert write_once(folder, write) == folder
    assert os.listdir(folder) == ["theirs"] and os.listdir(tmp_path) == ["set"]


# Writes that run out of storage ----------------------------------------------------------------

LIMITED = """\
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of dying
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
path = Path(sys.argv[1])
try:
{body}
except OSError as error:
    cause = error.__cause__
    print(json.dumps({{"errno": error.errno, "message": str(error),
                       "cause": type(cause).__name__ if cause else None}}))
"""


def write_limited(path: Path, body: str) -> dict:
    """Run ``body`` (``path`` in scope) in a process whose files may not exceed 100 kB."""
    script = LIMITED.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout, done.stderr
    return json.loads(done.stdout)


def assert_names_the_path(result: dict, path: Path, cause: str) -> None:
    assert result["errno"] == errno.EFBIG
    assert result["message"].startswith(f"[Errno {errno.EFBIG}] file size limit reached writing")
    assert f"writing {path} ([Errno {errno.EFBIG}] File too large)" in result["message"]
    assert result["cause"] == cause
    assert sorted(os.listdir(path.parent)) == [path.name], "a partial file remained"


def test_a_text_write_past_the_size_limit_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    result = write_limited(
        path,
        """
        from datamodules.files import write_atomic
        write_atomic(path, "x" * 1_000_000)
        """,
    )
    assert_names_the_path(result, path, "OSError")
    assert path.read_text() == "old"


def test_a_checkpoint_past_the_size_limit_names_the_file(tmp_path: Path) -> None:
    """torch.save reports the failed write as a RuntimeError ("unexpected pos") whose context is
    the file's OSError; the error raised names the checkpoint instead."""
    path = tmp_path / "last.ckpt"
    torch.save({"step": 1}, path)
    result = write_limited(
        path,
        """
        import torch
        from tasks.callbacks.checkpointing import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1_000_000)}, path)
        """,
    )
    assert_names_the_path(result, path, "RuntimeError")
    assert torch.load(path) == {"step": 1}


def test_other_write_errors_pass_unchanged(tmp_path: Path) -> None:
    from datamodules.files import atomic_file

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    error = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError) as raised, atomic_file(path) as file:
        file.write(b"new")
        raise error
    assert raised.value is error and path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["last.ckpt"]
