"""Responses to score as text: a JSONL file of ``{"user_id"?, "prompt", "response"}`` rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.sources import bad_rows_error, decode_utf8, user_id
from lore_pl.data.embedder import Item, as_messages
from lore_pl.data.preferences import IndexBatchSampler, ShardIndex
from lore_pl.errors import LoreDataError


@dataclass
class ResponseRows:
    """The file's rows: ``lines[i]`` is row i's line in the file (from 1), ``users[i]`` its user id
    (None: score it for every user), ``items[i]`` its ``[messages, response]``."""

    lines: list[int]
    users: list[str | None]
    items: list[Item]

    def __len__(self) -> int:
        return len(self.lines)


def user_id_of(value: Any, where: str) -> str | None:
    """A row's user id as a string; None when the field is absent or null (every user)."""
    if value is None:
        return None
    return user_id(value, where, " (leave it out to score the row for every user)")


def read_response_rows(path: Path, columns: dict[str, str]) -> ResponseRows:
    """Validated rows of a JSONL file; every bad row is found and they raise one ``LoreDataError``
    naming the file and each row's line and field (the first 20, then how many more)."""
    if path.suffix.lower() != ".jsonl":
        raise LoreDataError(f"{path}: responses to score are a .jsonl file (one JSON object a line)")
    if not path.is_file():
        raise FileNotFoundError(f"response file not found: {path}")
    rows = ResponseRows([], [], [])
    bad = []
    # split at b"\n" only: str.splitlines would also cut at U+2028, which JSON allows inside a string
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        line = decode_utf8(path, raw, first_line=number)
        if not line.strip():
            continue
        try:
            user, messages, response = parse_response_row(f"{path}: line {number}", line, columns)
        except LoreDataError as error:
            bad.append({"where": f"line {number}", "reason": str(error).removeprefix(f"{path}: line {number}: ")})
            continue
        rows.lines.append(number)
        rows.users.append(user)
        rows.items.append([messages, response])
    if bad:
        raise bad_rows_error(path, bad)
    if not rows.lines:
        raise LoreDataError(f"{path}: no rows")
    return rows


def parse_response_row(where: str, line: str, columns: dict[str, str]) -> tuple[str | None, list, str]:
    """(user or None, chat messages, response) of one line, or a ``LoreDataError`` prefixed by ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LoreDataError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise LoreDataError(f"{where}: a row is an object with fields {columns['prompt']!r}, "
                            f"{columns['response']!r} and optionally {columns['user_id']!r}, "
                            f"got {type(record).__name__}")
    for field in ("prompt", "response"):
        if record.get(columns[field]) is None:
            raise LoreDataError(f"{where}: field {columns[field]!r} is missing")
    user = user_id_of(record.get(columns["user_id"]), f"{where}: field {columns['user_id']!r}")
    messages = as_messages(record[columns["prompt"]], where=f"{where}: field {columns['prompt']!r}")
    response = record[columns["response"]]
    if not isinstance(response, str) or not response.strip():
        raise LoreDataError(f"{where}: field {columns['response']!r} must be a non-empty string, "
                            f"got {response!r:.60}")
    for value in [response, user or ""] + [turn[key] for turn in messages for key in turn]:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a JSON "\ud800" escape: a lone surrogate no tokenizer takes
            raise LoreDataError(f"{where}: a field holds text that is not valid Unicode ({value!r:.60})") from None
    return user, messages, response


class _Batches(Dataset):
    def __init__(self, rows: ResponseRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, ShardIndex):
            index = index.rows  # this rank's rows
        picked = torch.arange(len(self))[index].tolist()
        return {
            "line": torch.tensor([self.rows.lines[i] for i in picked], dtype=torch.long),
            "users": [self.rows.users[i] for i in picked],
            "items": [self.rows.items[i] for i in picked],
        }


class ResponseFileDataModule(LightningDataModule):
    """Responses to score, as text: one JSON object a line with a prompt (a string or a chat list of
    ``{"role", "content"}``), a response and optionally a user id (without one, or with null, the
    row is scored for every user the scoring module names). Blank lines are skipped.

    Args:
        path: the ``.jsonl`` file.
        user_column: field of the user id.
        prompt_column: field of the prompt.
        response_column: field of the response to score.
        batch_size: rows per prediction batch (the embedder splits it into its own ``batch_size``).
    """

    def __init__(self, path: str, user_column: str = "user_id", prompt_column: str = "prompt",
                 response_column: str = "response", batch_size: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path).expanduser()
        self.columns = {"user_id": user_column, "prompt": prompt_column, "response": response_column}
        self.batch_size = batch_size
        self.rows: ResponseRows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self.rows = read_response_rows(self.path, self.columns)

    def named_users(self) -> dict[str, int]:
        """Every user id the rows name, with the first line naming it (scoring checks them up front)."""
        self.setup()
        first: dict[str, int] = {}
        for line, user in zip(self.rows.lines, self.rows.users):
            if user is not None:
                first.setdefault(user, line)
        return first

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        batches = _Batches(self.rows)
        return DataLoader(batches, sampler=IndexBatchSampler(len(batches), self.batch_size, False, 0),
                          batch_size=None)
