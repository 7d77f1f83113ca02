"""The reward server's journal of user updates: one JSON record a line, appended and fsynced before an
update is acknowledged, and replayed on start; the basis is never written.

A crash can cut only the last line short: that record was never acknowledged, so it is dropped (and cut
off, so the next append starts a clean line). Any other line that does not read is refused by number.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from lore_pl.errors import LoreDataError

#: the operations a record may hold
OPERATIONS = ("personalize", "observe", "forget")


def encode_tensor(values: Tensor) -> dict:
    """A float32 tensor as JSON: its shape and its bytes (little-endian, base64), so replay is exact."""
    array = values.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4")
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_tensor(encoded: dict, where: str) -> Tensor:
    """The tensor ``encode_tensor`` wrote; a ``LoreDataError`` naming ``where`` if it does not read or is not finite."""
    import numpy as np

    try:
        shape = [int(size) for size in encoded["shape"]]
        array = np.frombuffer(base64.b64decode(encoded["float32"], validate=True), dtype="<f4").reshape(shape)
    except (KeyError, TypeError, ValueError) as error:
        raise LoreDataError(f"{where}: not a tensor record ({error})") from None
    values = torch.from_numpy(array.astype(np.float32))
    if not bool(torch.isfinite(values).all()):
        raise LoreDataError(f"{where}: holds NaN or Inf")
    return values


#: how every record begins (``updates``: ``op`` is the first key), so a torn tail is known as one
RECORD_START = b'{"op":"'


class Journal:
    """The append-only journal at ``path``. ``writer=True`` takes an exclusive lock on it (one server
    writes a journal at a time) and creates it; a reader follows what the writer appends (``read_new``)."""

    def __init__(self, path: str | os.PathLike, *, writer: bool) -> None:
        self.path = Path(path)
        self.writer = writer
        self._offset = 0  # bytes of complete records read so far
        self._sequence = 0  # records read or written so far
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the server's life
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise LoreDataError(f"--journal {self.path}: another server holds this journal; give each server its "
                                    "own journal (or stop the other one)") from None
            if created:  # the new name must survive a crash too
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        else:
            self._file = open(self.path, "rb")  # noqa: SIM115

    @property
    def sequence(self) -> int:
        """How many records the journal holds (read or written here)."""
        return self._sequence

    def read_new(self) -> Iterator[dict]:
        """The complete records appended since the last call (all of them at first), in order."""
        self._file.seek(self._offset)
        data = self._file.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines(keepends=True):
            self._offset += len(line)
            self._sequence += 1
            yield self._record(line)
        if self.writer and end < len(data):  # a torn, never acknowledged last record: cut it off
            if not data[end:].startswith(RECORD_START):  # not a record of ours: not a journal, leave it whole
                raise LoreDataError(f"--journal {self.path}: it ends in {len(data) - end} byte(s) that are not the "
                                    "start of a journal record; it is not a journal: give a new file")
            self._file.truncate(self._offset)
            os.fsync(self._file.fileno())

    def _record(self, line: bytes) -> dict:
        where = f"{self.path}: record {self._sequence}"
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LoreDataError(f"{where} does not read as JSON ({error}); the journal is damaged") from None
        if not (isinstance(record, dict) and record.get("op") in OPERATIONS and isinstance(record.get("user"), str)):
            raise LoreDataError(f"{where} is not an update record (an object with 'op' one of {OPERATIONS} and a "
                                "string 'user')")
        if record.get("seq") != self._sequence:
            raise LoreDataError(f"{where} says it is record {record.get('seq')!r}; records are missing or repeated")
        record["where"] = where
        return record

    def append(self, record: dict) -> int:
        """Write ``record`` (numbered next) as one line and fsync it; returns its number. Only once this
        returns may the update be acknowledged."""
        if not self.writer:
            raise RuntimeError("a journal opened for reading does not append")
        number = self._sequence + 1
        line = json.dumps({**record, "seq": number}, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self._file.seek(0, os.SEEK_END)
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:  # a disk full or failing: leave no part of the record for the next one to follow
            self._file.truncate(self._offset)
            raise
        self._offset += len(line)
        self._sequence = number
        return number

    def close(self) -> None:
        self._file.close()
