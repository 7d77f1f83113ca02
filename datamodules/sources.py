"""Where raw data come from: a local file or directory, or a Hugging Face data set repository."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

from lore_pl.data.files import hash_file
from lore_pl.errors import LoreDataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes: the revision of local data."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        hash_file(path, digest)
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


#: bad rows listed in one error (the count says how many there are in all)
MAX_REPORTED_ROWS = 20


def bad_rows_error(path: Path, bad: list[dict[str, Any]], hint: str = "") -> LoreDataError:
    """One error for every bad row (``where``, ``reason``) of ``path``: the first 20, then the count."""
    if len(bad) == 1:
        return LoreDataError(f"{path}: {bad[0]['where']}: {bad[0]['reason']}")
    shown = "".join(f"\n  {row['where']}: {row['reason']}" for row in bad[:MAX_REPORTED_ROWS])
    more = f"\n  ... and {len(bad) - MAX_REPORTED_ROWS} more" if len(bad) > MAX_REPORTED_ROWS else ""
    return LoreDataError(f"{path}: {len(bad)} bad rows{hint}:{shown}{more}")


def user_id(value: Any, where: str, empty_hint: str = "") -> str:
    """A row's user id as a stripped string: a string or a number; a list, dict, bool or NaN is a
    broken row, not a user."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise LoreDataError(f"{where} must be a string or a number, got {value!r:.60}")
    user = str(value).strip()
    if not user:
        raise LoreDataError(f"{where} is empty{empty_hint}")
    return user


class UnreadableLine(str):
    """A JSONL line that is not a row (not JSON, or not UTF-8: a line cut short by a crash, say): its
    text, and why it is unreadable. ``read_records(..., keep_bad_lines=True)`` returns it in the line's
    place, for the caller to report or skip with the other bad rows."""

    reason: str

    def __new__(cls, text: str, reason: str) -> UnreadableLine:
        line = super().__new__(cls, text)
        line.reason = reason
        return line


class Records(list):
    """A file's rows, with where each one is in the file (``where[i]``: "line 7", "row 3")."""

    def __init__(self, rows: list[Any], where: list[str]) -> None:
        super().__init__(rows)
        self.where = where


def read_records(path: Path, keep_bad_lines: bool = False) -> Records:
    """The rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``), ``.parquet`` or ``.csv`` file.

    A file that cannot be parsed raises ``LoreDataError`` naming it (and the line, for JSONL and CSV,
    where the bytes are not UTF-8 too). Each row knows its place in the file: its line (JSONL, CSV:
    blank lines and quoted line breaks counted) or its position (JSON, Parquet). With
    ``keep_bad_lines``, a JSONL line that is not JSON (or not UTF-8) is an ``UnreadableLine`` row
    instead of an error, for the caller to report or skip like any other bad row.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LoreDataError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
    try:
        return _read_records(path, suffix, keep_bad_lines)
    except LoreDataError:
        raise
    except (OSError, MemoryError):
        raise  # the disk, not the data
    except Exception as error:  # the parsers' own types (JSONDecodeError, ArrowInvalid, Error, ...)
        raise LoreDataError(f"{path}: not a readable {suffix} file ({type(error).__name__}: {error})") from error


def decode_utf8(path: Path, data: bytes, first_line: int = 1) -> str:
    """``data`` as text; bytes that are not UTF-8 are reported by line and column in ``path``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise LoreDataError(f"{path}: line {line}, byte {column}: not UTF-8 text "
                            f"({error.reason}: {data[error.start:error.end]!r})") from None


def _read_records(path: Path, suffix: str, keep_bad_lines: bool = False) -> Records:
    if suffix == ".jsonl":
        rows, where = [], []
        with open(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                try:
                    line = decode_utf8(path, raw, first_line=number)
                except LoreDataError as error:
                    if not keep_bad_lines:
                        raise
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    line = UnreadableLine(text, str(error).split(f"line {number}, ", 1)[-1])
                if line.strip():
                    if not isinstance(line, UnreadableLine):
                        text = line.rstrip("\r\n")
                        try:
                            line = json.loads(text)
                        except json.JSONDecodeError as error:
                            if not keep_bad_lines:
                                raise LoreDataError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
                            line = UnreadableLine(text, f"not valid JSON ({error.msg} at character {error.pos + 1} "
                                                        f"of {len(text)})")
                    rows.append(line)
                    where.append(f"line {number}")
        return Records(rows, where)
    if suffix == ".json":
        payload = json.loads(decode_utf8(path, path.read_bytes()))
        payload = payload.get("data", payload) if isinstance(payload, dict) else payload
        if not isinstance(payload, list):
            raise LoreDataError(f"{path}: expected a JSON list of rows")
        return Records(payload, [f"row {i}" for i in range(1, len(payload) + 1)])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()  # nested lists/structs stay Python lists/dicts
        return Records(rows, [f"row {i}" for i in range(1, len(rows) + 1)])
    # CSV with the standard library: it knows each record's lines (a quoted cell may span several)
    text = decode_utf8(path, path.read_bytes()).removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    rows, where, previous = [], [], reader.line_num
    for cells in reader:
        start, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        row = {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}
        rows.append({key: _csv_value(value) for key, value in row.items()})
        where.append(f"line {start}")
    return Records(rows, where)


def _csv_value(value: str | None) -> Any:
    """A CSV cell; a chat list (JSON, or the Python repr that ``DataFrame.to_csv`` writes) is read back
    as a list, never evaluated as code."""
    if value is not None and value.startswith("[") and value.endswith("]") and "role" in value:
        for parse in (json.loads, ast.literal_eval):  # literal_eval reads literals only, it runs nothing
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, list) and parsed and all(isinstance(turn, dict) for turn in parsed):
                return parsed
    return value


def read_all(paths: list[Path]) -> list[dict[str, Any]]:
    return [record for path in paths for record in read_records(path)]
