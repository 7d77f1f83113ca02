"""Your own preferences: a JSONL / JSON / Parquet / CSV file of (user, prompt, chosen, rejected)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.base import PreferenceData
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.pairs import ItemIndex, PairTable, build_preference_data, drop_users_without, split_fraction
from datamodules.sources import file_digest, read_records
from lore_pl.data.embedder import as_messages
from lore_pl.errors import LoreDataError


def parse_rows(path: Path, records: list[dict[str, Any]], columns: dict[str, str]) -> tuple[list[Any], dict[str, Any]]:
    """Validated rows -> (items, pair table). Bad rows raise ``LoreDataError`` naming file, row and field."""
    items, table = ItemIndex(), PairTable()
    for number, record in enumerate(records, 1):
        where = f"{path}: row {number}"
        if not isinstance(record, dict):
            raise LoreDataError(f"{where}: a row must be an object with fields {sorted(columns.values())}, "
                                f"got {type(record).__name__}")
        for field, column in columns.items():
            if record.get(column) is None:
                raise LoreDataError(f"{where}: field {column!r} ({field}) is missing")
        value = record[columns["user_id"]]
        # an id is a string or a number; a list, dict, bool or NaN is a broken row, not a user
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise LoreDataError(
                f"{where}: field {columns['user_id']!r} must be a string or a number, got {value!r:.60}"
            )
        user = str(value).strip()
        if not user:
            raise LoreDataError(f"{where}: field {columns['user_id']!r} is empty")
        messages = as_messages(record[columns["prompt"]], where=f"{where}: field {columns['prompt']!r}")
        texts = {}
        for field in ("chosen", "rejected"):
            value = record[columns[field]]
            if not isinstance(value, str) or not value.strip():
                raise LoreDataError(f"{where}: field {columns[field]!r} must be a non-empty string, got {value!r:.60}")
            texts[field] = value
        if texts["chosen"] == texts["rejected"]:
            raise LoreDataError(f"{where}: fields {columns['chosen']!r} and {columns['rejected']!r} are identical")
        for text in [user, texts["chosen"], texts["rejected"]] + [turn[key] for turn in messages for key in turn]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a JSON "\ud800" escape: a lone surrogate the cache could not store
                raise LoreDataError(f"{where}: a field holds text that is not valid Unicode ({text!r:.60})") from None
        group = repr(messages)  # the prompt itself: pairs on one prompt stay on one side of train/test
        table.append(user, items.add(messages, texts["chosen"]), items.add(messages, texts["rejected"]), group)
    if not table.columns["user"]:
        raise LoreDataError(f"{path}: no rows")
    return items.items, table.to_json()


class PreferenceFileDataModule(EmbeddedPreferenceDataModule):
    """Preference pairs from one local file, one row per judgment.

    Users are split into seen and unseen (``seen_fraction``, ``seed``); prompts into train and test
    (``test_fraction``, ``seed``), for all users at once, so that no prompt is in both train and
    test. Seen users train the basis on their train-prompt pairs; unseen users' train-prompt pairs
    are their few-shot pool; everyone is tested on their test-prompt pairs. A user without pairs on
    both sides is dropped (with a warning).

    Args:
        path: the file (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``).
        user_column: column of the user id.
        prompt_column: column of the prompt: a string, or a chat list of ``{"role", "content"}``.
        chosen_column: column of the preferred response.
        rejected_column: column of the other response.
        seen_fraction: fraction of users who train the basis (the rest are adapted few-shot).
        test_fraction: fraction of prompts held out for testing.
        seed: seed of both splits.
        **kwargs: the loading arguments of ``EmbeddedPreferenceDataModule`` (batch sizes, shuffling,
            the validation hold-out, the cache and the embedder).
    """

    def __init__(
        self,
        path: str,
        user_column: str = "user_id",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        seen_fraction: float = 0.5,
        test_fraction: float = 0.5,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("seen_fraction", seen_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        self.path = Path(path).expanduser()
        self.columns = {
            "user_id": user_column,
            "prompt": prompt_column,
            "chosen": chosen_column,
            "rejected": rejected_column,
        }
        self.seen_fraction, self.test_fraction, self.seed = seen_fraction, test_fraction, seed

    def source_revision(self) -> str:
        if not self.path.is_file():
            raise FileNotFoundError(f"preference file {self.path} does not exist")
        return file_digest([self.path])

    def source_options(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        return parse_rows(self.path, read_records(self.path), self.columns)

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        users = np.asarray(table["user"], dtype=object)
        groups = np.asarray(table["group"], dtype=object)
        seen, _ = split_fraction(users, self.seen_fraction, self.seed)
        test_groups, _ = split_fraction(groups, self.test_fraction, self.seed + 1)
        is_seen, is_test = np.isin(users, seen), np.isin(groups, test_groups)
        role_rows = {
            "seen_train": np.flatnonzero(is_seen & ~is_test),
            "seen_test": np.flatnonzero(is_seen & is_test),
            "unseen_pool": np.flatnonzero(~is_seen & ~is_test),
            "unseen_test": np.flatnonzero(~is_seen & is_test),
        }
        before = set(users)
        drop_users_without(role_rows, users, "seen_train", "seen_test")
        drop_users_without(role_rows, users, "unseen_pool", "unseen_test")
        dropped = before - set(users[np.concatenate(list(role_rows.values()))])
        if dropped:
            rank_zero_warn(
                f"{self.path}: {len(dropped)} user(s) have no pairs on train or on test prompts and are dropped"
            )
        return build_preference_data(table, embeddings, reference_head, role_rows)
