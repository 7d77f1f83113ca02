"""Your own preferences: a JSONL / JSON / Parquet / CSV file of (user, prompt, chosen, rejected)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.base import PreferenceData
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.pairs import ItemIndex, PairTable, build_preference_data, drop_users_without, split_fraction
from datamodules.sources import UnreadableLine, bad_rows_error, file_digest, read_records, user_id
from lore_pl.data.embedder import as_messages
from lore_pl.errors import LoreDataError


def parse_rows(path: Path, records: list[dict[str, Any]], columns: dict[str, str],
               skip_bad_rows: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """Validated rows -> (items, pair table). Every bad row is found, each named by file, line (or
    row) and field; they raise one ``LoreDataError`` listing them, or with ``skip_bad_rows`` are left
    out and listed in the table's ``skipped`` (where, reason, the row)."""
    items, table = ItemIndex(), PairTable()
    where_of = getattr(records, "where", None) or [f"row {i}" for i in range(1, len(records) + 1)]
    bad = []
    for where, record in zip(where_of, records):
        try:
            user, messages, chosen, rejected = parse_row(f"{path}: {where}", record, columns)
        except LoreDataError as error:
            bad.append({"where": where, "reason": str(error).removeprefix(f"{path}: {where}: "),
                        "row": record if _jsonable(record) else repr(record)})
            continue
        group = repr(messages)  # the prompt itself: pairs on one prompt stay on one side of train/test
        table.append(user, items.add(messages, chosen), items.add(messages, rejected), group)
    if bad and not skip_bad_rows:
        raise bad_rows_error(path, bad, " (skip them with skip_bad_rows: true)")
    if not table.columns["user"]:
        raise LoreDataError(f"{path}: no rows" + (f" left after skipping {len(bad)} bad rows" if bad else ""))
    payload = dict(table.to_json())
    payload["skipped"] = bad
    return items.items, payload


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_row(where: str, record: Any, columns: dict[str, str]) -> tuple[str, list[dict[str, str]], str, str]:
    """(user, chat messages, chosen, rejected) of one row, or a ``LoreDataError`` prefixed by ``where``."""
    if isinstance(record, UnreadableLine):
        raise LoreDataError(f"{where}: {record.reason}")
    if not isinstance(record, dict):
        raise LoreDataError(f"{where}: a row must be an object with fields {sorted(columns.values())}, "
                            f"got {type(record).__name__}")
    for field, column in columns.items():
        if record.get(column) is None:
            raise LoreDataError(f"{where}: field {column!r} ({field}) is missing")
    user = user_id(record[columns["user_id"]], f"{where}: field {columns['user_id']!r}")
    messages = as_messages(record[columns["prompt"]], where=f"{where}: field {columns['prompt']!r}")
    texts = {}
    for field in ("chosen", "rejected"):
        value = record[columns[field]]
        if not isinstance(value, str) or not value.strip():
            raise LoreDataError(f"{where}: field {columns[field]!r} must be a non-empty string, got {value!r:.60}")
        texts[field] = value
    if texts["chosen"].split() == texts["rejected"].split():  # equal but for spaces: a pair of one response
        raise LoreDataError(f"{where}: fields {columns['chosen']!r} and {columns['rejected']!r} are identical"
                            + ("" if texts["chosen"] == texts["rejected"] else " up to whitespace"))
    for text in [user, texts["chosen"], texts["rejected"]] + [turn[key] for turn in messages for key in turn]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a JSON "\ud800" escape: a lone surrogate the cache could not store
            raise LoreDataError(f"{where}: a field holds text that is not valid Unicode ({text!r:.60})") from None
    return user, messages, texts["chosen"], texts["rejected"]


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
        skip_bad_rows: leave out rows that fail validation (listed, with the reason, in
            ``skipped_rows.jsonl`` in the run directory) instead of stopping with the list of them.
        min_pairs_per_user: users with fewer valid pairs than this are dropped (a warning counts them).
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
        skip_bad_rows: bool = False,
        min_pairs_per_user: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(min_pairs_per_user, bool) or not isinstance(min_pairs_per_user, int) or min_pairs_per_user < 1:
            raise ValueError(f"min_pairs_per_user must be an integer >= 1, got {min_pairs_per_user!r}")
        self.skip_bad_rows, self.min_pairs_per_user = bool(skip_bad_rows), min_pairs_per_user
        self.skipped_rows: list[dict[str, Any]] = []
        self._skipped_reported = False
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
        return {"columns": self.columns, "skip_bad_rows": self.skip_bad_rows}

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        records = read_records(self.path, keep_bad_lines=True)  # a line cut short is a bad row like the others
        return parse_rows(self.path, records, self.columns, skip_bad_rows=self.skip_bad_rows)

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        users = np.asarray(table["user"], dtype=object)
        groups = np.asarray(table["group"], dtype=object)
        self.skipped_rows = list(table.get("skipped", []))
        names, counts = np.unique(users.astype(str), return_counts=True)
        few = set(names[counts < self.min_pairs_per_user])
        if few:
            rank_zero_warn(f"{self.path}: {len(few)} user(s) have fewer than min_pairs_per_user="
                           f"{self.min_pairs_per_user} pairs and are dropped")
        kept = ~np.isin(users.astype(str), list(few))
        seen, _ = split_fraction(users, self.seen_fraction, self.seed)
        test_groups, _ = split_fraction(groups, self.test_fraction, self.seed + 1)
        is_seen, is_test = np.isin(users, seen), np.isin(groups, test_groups)
        role_rows = {
            "seen_train": np.flatnonzero(kept & is_seen & ~is_test),
            "seen_test": np.flatnonzero(kept & is_seen & is_test),
            "unseen_pool": np.flatnonzero(kept & ~is_seen & ~is_test),
            "unseen_test": np.flatnonzero(kept & ~is_seen & is_test),
        }
        if not any(len(rows) for rows in role_rows.values()):
            raise LoreDataError(f"{self.path}: no user has min_pairs_per_user={self.min_pairs_per_user} pairs")
        before = set(users[kept])
        drop_users_without(role_rows, users, "seen_train", "seen_test")
        drop_users_without(role_rows, users, "unseen_pool", "unseen_test")
        dropped = before - set(users[np.concatenate(list(role_rows.values()))])
        if dropped:
            rank_zero_warn(
                f"{self.path}: {len(dropped)} user(s) have no pairs on train or on test prompts and are dropped"
            )
        return build_preference_data(table, embeddings, reference_head, role_rows)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.skipped_rows and not self._skipped_reported:
            self._skipped_reported = True
            written = self._write_skipped_rows()
            where = (f"the list is {written}" if written else
                     "no list is written without a Trainer: they are in the data module's skipped_rows")
            rank_zero_warn(f"{self.path}: {len(self.skipped_rows)} bad row(s) skipped (first: "
                           f"{self.skipped_rows[0]['where']}: {self.skipped_rows[0]['reason']}); {where}")

    def _write_skipped_rows(self) -> Path | None:
        """``skipped_rows.jsonl`` in the run directory (the logger's, or ``default_root_dir`` without a
        logger, where the run's config and protocol go too); None without a Trainer."""
        trainer = self.trainer
        if trainer is None:
            return None
        path = Path(trainer.log_dir or trainer.default_root_dir) / "skipped_rows.jsonl"  # every process asks
        if trainer.is_global_zero:  # (a broadcast); the first one writes
            from lore_pl.data.atomic import write_atomic

            write_atomic(path, lambda stream: stream.writelines(
                json.dumps(row, ensure_ascii=False) + "\n" for row in self.skipped_rows))
        return path
