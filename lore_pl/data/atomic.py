"""Writes that never leave a half-written file: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
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


def write_atomic_path(path: str | os.PathLike, write_to: Callable[[str], None], fsync: bool = False) -> Path:
    """Have ``write_to(temporary_path)`` write the file, then rename it to ``path``.

    For writers that take a file name (safetensors, numpy); a failure leaves ``path`` as it was, and
    the error names ``path`` (a full disk raises deep inside the writer, e.g. torch's "enforce fail").
    The file gets the umask's mode; ``fsync`` puts the bytes on disk before the name points at them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
