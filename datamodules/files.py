"""File conventions the whole project shares: which suffixes are images, writing a file so that
a reader sees the old version or the new one, never a partial one, and checking an output folder
writable before any work starts."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

#: Suffixes (lower case) read as images: folders of predict queries and ImageFolder classes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def visible(path: Path) -> bool:
    """Whether a folder entry is data: hidden names (``.ipynb_checkpoints``, macOS's ``._*``
    companions, ``.DS_Store``) are not classes or images."""
    return not path.name.startswith(".")


#: errno of a write that failed for lack of storage -> how its message says so.
STORAGE_FULL = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
}


def storage_full(error: BaseException) -> OSError | None:
    """The out-of-storage ``OSError`` behind ``error``, if any. ``torch.save`` into a Python file
    reports a failed ``write`` as a ``RuntimeError`` ("[enforce fail at inline_container.cc]
    unexpected pos ...", torch 2.x) whose ``__context__`` is the file's ``OSError``."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in STORAGE_FULL:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file that replaces ``path`` only once fully written and synced to disk.

    The temporary file sits beside the target (a rename across filesystems would be a copy, and a
    kill during it would leave a truncated file) and gets the permissions of a normally written
    file (0644, readable by the other users of a shared cache or checkpoint folder). A write that
    fails for lack of storage raises an ``OSError`` of the same errno naming ``path`` (torch's
    own error names neither the file nor the cause).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException as error:
        Path(partial).unlink(missing_ok=True)
        full = storage_full(error) if isinstance(error, Exception) else None
        if full is None:
            raise
        raise OSError(full.errno, f"{STORAGE_FULL[full.errno]} writing {path} ({full})") from error


def write_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as file:
        file.write(text)


@contextlib.contextmanager
def writable_output(path: Path, option: str, what: str = "predictions") -> Iterator[None]:
    """Turn an ``OSError`` while preparing ``path`` into an error naming it and the option to
    change, raised before any prediction or test is run."""
    try:
        yield
    except OSError as error:
        raise PermissionError(
            f"cannot write {what} to {str(path)!r} ({error}); pass a writable path as {option}"
        ) from error


def writable_folder(path: Path, option: str, what: str) -> None:
    """Create ``path`` and check a file can be written there, before any work starts (a probe
    file of its own: the processes of a DDP job check the same folder at once)."""
    with writable_output(path, option, what):
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)


def data_dir() -> Path:
    """Root of downloads, generated data and caches: ``$FEWSHOT_DATA_DIR`` or
    ``~/.cache/fewshot-dilated``."""
    return Path(os.environ.get("FEWSHOT_DATA_DIR", Path.home() / ".cache" / "fewshot-dilated"))


def write_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """Create ``folder`` with ``write(tmp)`` into a temporary sibling renamed at the end, so
    concurrent processes and interrupted runs never leave a partial folder behind. A folder that
    cannot be written raises a ``PermissionError`` naming it and the option to change, unless a
    concurrent process wrote it first."""
    if folder.is_dir():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            write(partial)
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as error:
        if not folder.is_dir():
            raise PermissionError(
                f"cannot write generated data to {str(folder)!r} ({error}); pass a writable "
                "--data.root (or set FEWSHOT_DATA_DIR)"
            ) from error
    return folder
