"""Row blocks of ``.npy`` files, written and read without holding the whole array or mapping it.

A split larger than a comfortable share of RAM (the test pairs of 100k users) is written block by
block (``write_npy_rows``) and read back block by block (``read_npy_rows``) with plain file reads:
the process holds one block, and no mapped page of the file counts in its resident memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lore_pl.data.atomic import write_atomic_path
from lore_pl.errors import LoreDataError


def write_npy_rows(path: str | os.PathLike, shape: tuple[int, int], dtype: np.dtype | str,
                   blocks: Iterable[np.ndarray]) -> Path:
    """Write the ``.npy`` array ``shape`` of ``dtype`` from ``blocks`` of consecutive rows (each ``[n, shape[1]]``),
    atomically: a failure or a wrong row count leaves no file at ``path``."""
    dtype = np.dtype(dtype)

    def write_to(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            np.lib.format.write_array_header_2_0(
                stream, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
            written = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.ndim != 2 or block.shape[1] != shape[1]:
                    raise ValueError(f"{path}: a block of shape {block.shape} does not fit rows of {shape[1]}")
                block.tofile(stream)
                written += block.shape[0]
        if written != shape[0]:
            raise ValueError(f"{path}: {written} rows written, the header says {shape[0]}")

    return write_atomic_path(path, write_to)


def npy_layout(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order ``.npy`` file."""
    with open(path, "rb") as stream:
        try:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
        except ValueError as error:
            raise LoreDataError(f"{path}: not a readable .npy file ({error})") from error
        if fortran_order:
            raise LoreDataError(f"{path}: a Fortran-order array; rows cannot be read in blocks")
        return shape, dtype, stream.tell()


def read_npy_rows(path: str | os.PathLike, start: int, stop: int,
                  layout: tuple[tuple[int, ...], np.dtype, int] | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a 2-d ``.npy`` file as a fresh array (a plain read: nothing stays mapped)."""
    shape, dtype, offset = layout or npy_layout(path)
    if not 0 <= start <= stop <= shape[0]:
        raise IndexError(f"{path}: rows {start}:{stop} out of range for {shape[0]} rows")
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = np.fromfile(path, dtype=dtype, count=(stop - start) * row_bytes // dtype.itemsize,
                       offset=offset + start * row_bytes)
    return rows.reshape((stop - start, *shape[1:]))
