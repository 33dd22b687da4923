"""The writability check of prediction and results outputs, shared by the tasks' writers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


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
    """Create ``path`` and check a file can be written there, before any work starts."""
    with writable_output(path, option, what):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.touch()
        probe.unlink()
