"""Reading the project's files: one place that turns a parser's error into one that names the file.

JSON, ``.npy`` (optionally memory-mapped), safetensors and ``.pt`` tensors are read here. Nothing read
runs code: ``.npy`` without pickles, ``.pt`` with ``torch.load(weights_only=True)``. A missing file is
a ``FileNotFoundError`` naming what was looked for; anything unreadable (truncated, empty, corrupt,
the wrong kind) is a ``LoreDataError`` naming the file and what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from lore_pl.errors import LoreDataError

T = TypeVar("T")
#: the suffixes ``read_tensor`` understands
TENSOR_SUFFIXES = (".safetensors", ".npy", ".pt")


def hash_file(path: str | os.PathLike, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    """``digest`` (a new sha256 where None) updated with the bytes of ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest


def readable(path: str | os.PathLike, what: str, read: Callable[[Path], T]) -> T:
    """``read(path)``, with errors that say which ``what`` (e.g. "feature cache manifest") failed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return read(path)
    except (LoreDataError, MemoryError):
        raise
    except pickle.UnpicklingError as error:
        raise LoreDataError(f"{path}: refused: the {what} holds objects other than tensors and plain values, "
                            f"and loading those could run code ({str(error).splitlines()[0]})") from None
    except Exception as error:  # every parser has its own types: JSONDecodeError, SafetensorError, EOFError, ...
        detail = "the file is empty" if path.stat().st_size == 0 else f"{type(error).__name__}: {error}"
        raise LoreDataError(f"{path}: not a readable {what} ({detail})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    return readable(path, what, lambda p: json.loads(p.read_text(encoding="utf-8")))


def read_npy(path: str | os.PathLike, what: str = ".npy array", mmap_mode: str | None = None) -> np.ndarray:
    """An array without pickles (memory-mapped with ``mmap_mode``); a truncated file is refused here."""
    return readable(path, what, lambda p: np.load(p, mmap_mode=mmap_mode, allow_pickle=False))


def read_tensors(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""

    def read(p: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
            return tensors, dict(handle.metadata() or {})

    return readable(path, what, read)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint's contents, read without running code from it."""
    checkpoint = readable(path, what, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if not isinstance(checkpoint, dict):
        raise LoreDataError(f"{path}: not a readable {what} (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def read_tensor(path: str | os.PathLike, what: str, key: str | None = None) -> Tensor:
    """One tensor from a ``.safetensors`` file (the tensor ``key``, or its only one), a ``.npy`` array or
    a ``.pt`` file holding a tensor (or a dict with the tensor ``key``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, _ = read_tensors(path, what)
        if key is None and len(tensors) == 1:
            return next(iter(tensors.values()))
        if key not in tensors:
            raise LoreDataError(f"{path}: no tensor {key!r} in this {what} (found {sorted(tensors) or 'none'})")
        return tensors[key]
    if suffix == ".npy":
        return torch.from_numpy(np.array(read_npy(path, what)))
    if suffix == ".pt":
        value = readable(path, what, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if isinstance(value, dict) and key in value:
            value = value[key]
        if not isinstance(value, Tensor):
            found = f"a dict with keys {sorted(map(str, value))}" if isinstance(value, dict) else type(value).__name__
            raise LoreDataError(f"{path}: the {what} must hold a tensor{f' (or a dict with {key!r})' if key else ''}, "
                                f"found {found}")
        return value
    raise LoreDataError(f"{path}: a {what} must be one of {', '.join(TENSOR_SUFFIXES)}, not {suffix or 'no suffix'!r}")
