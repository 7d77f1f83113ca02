"""Where raw data come from: a local file or directory, or a Hugging Face data set repository."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from lore_pl.errors import LoreDataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes: the revision of local data."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def local_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))


def resolve(source: str, revision: str = "main", allow_patterns: list[str] | None = None) -> tuple[Path, str]:
    """(local root, revision) of ``source``: an existing path (revision = hash of its data files), or
    a Hub data set id, downloaded with ``huggingface_hub`` (revision = the resolved commit)."""
    path = Path(source).expanduser()
    if path.exists():
        return path, file_digest(local_files(path))
    from huggingface_hub import snapshot_download

    local = Path(
        snapshot_download(repo_id=source, repo_type="dataset", revision=revision, allow_patterns=allow_patterns)
    )
    return local, local.name  # snapshots/<commit>


def find_files(root: Path, *name_parts: str) -> list[Path]:
    """All data files under ``root`` whose relative path contains every one of ``name_parts``."""
    found = [
        p
        for p in local_files(root)
        if all(part in str(p.relative_to(root) if root.is_dir() else p.name) for part in name_parts)
    ]
    if not found:
        raise FileNotFoundError(f"no data file with {name_parts} in its path ({', '.join(SUFFIXES)}) under {root}")
    return found


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``), ``.parquet`` or ``.csv`` file.

    A file that cannot be parsed raises ``LoreDataError`` naming it (and the line, for JSONL).
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LoreDataError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
    try:
        return _read_records(path, suffix)
    except LoreDataError:
        raise
    except (OSError, MemoryError):
        raise  # the disk, not the data
    except Exception as error:  # the parsers' own types (JSONDecodeError, ArrowInvalid, ParserError, ...)
        raise LoreDataError(f"{path}: not a readable {suffix} file ({type(error).__name__}: {error})") from error


def _read_records(path: Path, suffix: str) -> list[dict[str, Any]]:
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise LoreDataError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        return records
    if suffix == ".json":
        payload = json.loads(path.read_text(encoding="utf-8"))
        payload = payload.get("data", payload) if isinstance(payload, dict) else payload
        if not isinstance(payload, list):
            raise LoreDataError(f"{path}: expected a JSON list of rows")
        return payload
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()  # nested lists/structs stay Python lists/dicts
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []  # an empty file: "no rows", said by the caller with its context
    return [{key: _clean(value) for key, value in row.items()} for row in frame.to_dict(orient="records")]


def read_all(paths: list[Path]) -> list[dict[str, Any]]:
    return [record for path in paths for record in read_records(path)]
