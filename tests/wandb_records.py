"""Read back what W&B wrote offline: the records of ``run-<id>.wandb`` and the run's files.

The ``.wandb`` file is a LevelDB-style log (32 KiB blocks; each chunk a 7-byte header of CRC32,
little-endian length and chunk type) of ``wandb_internal_pb2.Record`` messages after a 7-byte
``:W&B`` file header. Parsed with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:
            position += left  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:
            position += left  # zero padding to the end of the block
            continue
        if position + HEADER + length > len(data):
            break  # a record still being written
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind in (FIRST, MIDDLE):
            pending = (b"" if kind == FIRST else pending) + chunk
            continue
        else:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record


class OfflineRun:
    """One ``wandb/offline-run-*`` folder, read once the run is closed.

    ``wandb.finish()`` returns before W&B's service process has written the run's last records
    (seen with wandb 0.31: a run read right after its command ended lacked its last history rows
    and its exit record in 2 of 3 tries), so the file is re-read until its exit record is there,
    for at most ``timeout`` seconds.
    """

    def __init__(self, folder: Path, timeout: float = 60.0) -> None:
        self.folder = folder
        (self.file,) = folder.glob("run-*.wandb")
        deadline = time.monotonic() + timeout
        self.records = list(records(self.file))
        while self.exit_code is None and time.monotonic() < deadline:
            time.sleep(0.5)
            self.records = list(records(self.file))

    @property
    def id(self) -> str:
        return self.file.stem.removeprefix("run-")

    def history(self) -> list[dict]:
        """Every ``log`` call: key -> decoded value."""
        rows = []
        for record in self.records:
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
        return rows

    def config(self) -> dict:
        config = {}
        for record in self.records:
            if record.WhichOneof("record_type") == "config":
                for item in record.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        return config

    @property
    def exit_code(self) -> int | None:
        """The exit code the run was closed with; ``None`` if it never was."""
        for record in self.records:
            if record.WhichOneof("record_type") == "exit":
                return record.exit.exit_code
        return None
