"""Your own preferences: a JSONL / JSON / Parquet / CSV file of (user, prompt, chosen, rejected)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.base import DEFAULT_VAL_FRACTION, PreferenceData
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.pairs import ItemIndex, PairTable, build_preference_data, split_fraction
from datamodules.sources import UnreadableLine, bad_rows_error, file_digest, read_records, user_id
from datamodules.splits import SPLIT_CHOICES, PairRows, SplitPlan, SplitSettings, make_plan, say
from lore_pl.data.embedder import as_messages
from lore_pl.data.outputs import OutputKind, check_output, first_line_starts
from lore_pl.errors import LoreDataError

#: the table's list of the group column's values (only where ``group_column`` is set)
GROUP_KEY = "split_group"


def parse_rows(path: Path, records: list[dict[str, Any]], columns: dict[str, str],
               skip_bad_rows: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """Validated rows -> (items, pair table). Every bad row is found, each named by file, line (or
    row) and field; they raise one ``LoreDataError`` listing them, or with ``skip_bad_rows`` are left
    out and listed in the table's ``skipped`` (where, reason, the row)."""
    items, table = ItemIndex(), PairTable()
    where_of = getattr(records, "where", None) or [f"row {i}" for i in range(1, len(records) + 1)]
    bad, split_groups = [], []
    for where, record in zip(where_of, records):
        try:
            user, messages, chosen, rejected = parse_row(f"{path}: {where}", record, columns)
        except LoreDataError as error:
            bad.append({"where": where, "reason": str(error).removeprefix(f"{path}: {where}: "),
                        "row": record if _jsonable(record) else repr(record)})
            continue
        group = repr(messages)  # the prompt itself: pairs on one prompt stay on one side of train/test
        table.append(user, items.add(messages, chosen), items.add(messages, rejected), group)
        if "group" in columns:
            split_groups.append(user_id(record[columns["group"]], f"{path}: {where}: field {columns['group']!r}"))
    if bad and not skip_bad_rows:
        raise bad_rows_error(path, bad, " (skip them with skip_bad_rows: true)")
    if not table.columns["user"]:
        raise LoreDataError(f"{path}: no rows" + (f" left after skipping {len(bad)} bad rows" if bad else ""))
    payload = dict(table.to_json())
    payload["skipped"] = bad
    if "group" in columns:
        payload[GROUP_KEY] = split_groups
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


#: the list of skipped rows it writes into the run directory (or the current folder without a logger)
SKIPPED_ROWS = OutputKind("PreferenceFileDataModule", first_line_starts('{"where"'), "its own skipped_rows.jsonl",
                          "remove it, or give the trainer another default_root_dir")


class PreferenceFileDataModule(EmbeddedPreferenceDataModule):
    """Preference pairs from one local file, one row per judgment.

    Users are split into seen and unseen (``seen_fraction``, ``seed``). Each user's pairs are then
    cut into train, validation and test by ``split_by`` (``datamodules/splits.py``): ``prompt``
    holds out whole prompts for everyone (no test prompt is anyone's training prompt);
    ``user_prompts`` divides each user's own prompts; ``response`` holds out responses (no test
    response is in any training pair; pairs mixing the two are dropped); ``auto`` picks one from the
    file's shape and says why. Validation is cut the same way. Seen users train the basis on their
    training pairs; unseen users' training pairs are their few-shot pool; everyone is tested on
    their test pairs. A user without training and test pairs is dropped. The plan (users, pairs,
    prompts and responses per role; who was dropped and why) is printed before anything is
    embedded, and a plan that leaves no user trainable stops there with a ``LoreDataError``.

    Args:
        path: the file (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``).
        user_column: column of the user id.
        prompt_column: column of the prompt: a string, or a chat list of ``{"role", "content"}``.
        chosen_column: column of the preferred response.
        rejected_column: column of the other response.
        seen_fraction: fraction of users who train the basis (the rest are adapted few-shot).
        test_fraction: the share held out for testing: of the prompts (``prompt``), of each user's
            prompts (``user_prompts``), or of the kept pairs (``response``).
        seed: seed of both splits.
        split_by: ``prompt``, ``user_prompts``, ``response`` or ``auto`` (the default).
        group_column: an optional column (string or number) whose rows stay on one side of the split:
            pairs of one group are never split between train, validation and test.
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
        split_by: Literal["auto", "prompt", "user_prompts", "response"] = "auto",
        group_column: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if split_by not in SPLIT_CHOICES:
            raise ValueError(f"split_by must be one of {', '.join(SPLIT_CHOICES)}, got {split_by!r}")
        self.split_by = split_by
        self.split_plan: SplitPlan | None = None
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
        if group_column is not None:
            self.columns["group"] = group_column
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

    @property
    def held_out(self) -> str:
        """What the test pairs hold out under the split plan (``prompts`` before there is one)."""
        mode = self.split_plan.mode if self.split_plan is not None else "prompt"
        return {"prompt": "prompts", "user_prompts": "own prompts", "response": "responses"}[mode]

    def plan_splits(self, table: dict[str, Any]) -> None:
        if self.split_plan is not None:
            return  # planned once (before the embedding); the table does not change
        users = np.asarray(table["user"], dtype=object).astype(str)
        names, counts = np.unique(users, return_counts=True)
        few = set(names[counts < self.min_pairs_per_user].tolist())
        if few:
            rank_zero_warn(f"{self.path}: {len(few)} user(s) have fewer than min_pairs_per_user="
                           f"{self.min_pairs_per_user} pairs and are dropped")
            if len(few) == len(names):
                raise LoreDataError(f"{self.path}: no user has min_pairs_per_user={self.min_pairs_per_user} pairs")
        seen, _ = split_fraction(users, self.seen_fraction, self.seed)
        val_fraction = DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction
        settings = SplitSettings(self.test_fraction, val_fraction, self.seed, self.val_seed)
        rows = PairRows.from_table(table, GROUP_KEY if "group" in self.columns else None)
        self.split_plan = make_plan(rows, self.split_by, set(seen), settings, str(self.path), few)
        say(self.split_plan.describe(rows, str(self.path), self.split_by))

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        self.skipped_rows = list(table.get("skipped", []))
        self.plan_splits(table)
        return build_preference_data(table, embeddings, reference_head, self.split_plan.role_rows,
                                     self.response_lengths())

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

            check_output(path, SKIPPED_ROWS)  # a file of the user's of that name stays whole
            write_atomic(path, lambda stream: stream.writelines(
                json.dumps(row, ensure_ascii=False) + "\n" for row in self.skipped_rows))
        return path
