"""Writes that never leave a half-written file: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic_path(path: str | os.PathLike, write_to: Callable[[str], None]) -> Path:
    """Have ``write_to(temporary_path)`` write the file, then rename it to ``path``.

    For writers that take a file name (safetensors, numpy); a failure leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Write ``path`` through ``write(stream)`` into a temporary file, then rename it into place."""

    def write_to(tmp: str) -> None:
        with open(tmp, "wb" if binary else "w", newline=None if binary else "") as stream:
            write(stream)

    return write_atomic_path(path, write_to)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return write_atomic(path, lambda stream: json.dump(payload, stream, ensure_ascii=False))


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    return write_atomic(path, lambda stream: np.save(stream, array), binary=True)
