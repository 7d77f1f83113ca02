"""Writes that never leave a half-written file: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def file_mode(base: int = 0o666) -> int:
    """The mode a newly created file (``base`` 0o666, as ``open`` gives) or directory (0o777) gets under
    the process's umask; ``mkstemp``/``mkdtemp`` make them private, which would hide a basis or a
    checkpoint from everyone else."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


#: this machine, as temporary and lock files name it (a pid means something only on its own machine)
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def process_is_alive(pid: int) -> bool:
    """Whether a process of this machine with this id runs (one of another user's counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_prefix(path: Path) -> str:
    """``.NAME.PID-HOST.``: the start of the name of a temporary file that becomes ``path``; the writer's pid
    and machine let a later run tell a dead writer's leftover from a live writer's file."""
    return f".{path.name}.{os.getpid()}-{HOST_TAG}."


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files beside ``path`` that a writer of ``path`` on this machine left when it was
    killed: named ``.NAME.PID-HOST.XXXXXXXX.tmp`` with a dead PID (never this process's, never any other name)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-([0-9a-f]{{8}})\.[a-z0-9_]{{8}}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and match.group(2) == HOST_TAG and int(match.group(1)) != os.getpid() \
                and not process_is_alive(int(match.group(1))) and entry.is_file(follow_symlinks=False):
            stale.append(Path(entry.path))
    return stale


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete ``stale_temporaries(path)``; returns what was deleted."""
    removed = []
    for stale in stale_temporaries(path):
        try:
            stale.unlink()
            removed.append(stale)
        except FileNotFoundError:  # another run cleaned it first
            pass
    return removed


def write_atomic_path(path: str | os.PathLike, write_to: Callable[[str], None], fsync: bool = False) -> Path:
    """Have ``write_to(temporary_path)`` write the file, then rename it to ``path``.

    For writers that take a file name (safetensors, numpy); a failure leaves ``path`` as it was, and
    the error names ``path`` (a full disk raises deep inside the writer, e.g. torch's "enforce fail").
    The file gets the umask's mode; ``fsync`` puts the bytes on disk before the name points at them.
    Temporary files that killed writers of ``path`` left beside it are deleted first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(handle)
    try:
        try:
            write_to(tmp)
            os.chmod(tmp, file_mode())
            if fsync:
                with open(tmp, "rb+") as stream:
                    os.fsync(stream.fileno())
        except (OSError, RuntimeError) as error:
            raise OSError(f"{path}: could not be written ({type(error).__name__}: {error}); "
                          "an earlier file of that name is unchanged") from error
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False,
                 fsync: bool = False) -> Path:
    """Write ``path`` through ``write(stream)`` into a temporary file, then rename it into place."""

    def write_to(tmp: str) -> None:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as stream:
            write(stream)

    return write_atomic_path(path, write_to, fsync=fsync)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return write_atomic(path, lambda stream: json.dump(payload, stream, ensure_ascii=False))


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    return write_atomic(path, lambda stream: np.save(stream, array), binary=True)


class AtomicTarget:
    """A file written in parts over time (a stream of batches) that appears whole or not at all: the parts go
    to a temporary file beside ``path`` (named as ``write_atomic_path``'s, so a killed writer's leftover
    is cleaned the same way); ``commit`` renames it to ``path``, ``discard`` deletes it."""

    def __init__(self, path: str | os.PathLike, fsync: bool = False) -> None:
        self.path, self.fsync = Path(path), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        handle, self.temporary = tempfile.mkstemp(dir=self.path.parent, prefix=temporary_prefix(self.path),
                                                  suffix=".tmp")
        os.close(handle)

    def commit(self) -> Path:
        try:
            os.chmod(self.temporary, file_mode())
            if self.fsync:
                with open(self.temporary, "rb+") as stream:
                    os.fsync(stream.fileno())
            os.replace(self.temporary, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        Path(self.temporary).unlink(missing_ok=True)
