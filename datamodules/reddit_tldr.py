"""Reddit TL;DR summaries judged by OpenAI's labelling workers (``openai/summarize_from_feedback``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from torch import Tensor

from datamodules.base import PreferenceData
from datamodules.embedded import HubPreferenceDataModule
from datamodules.pairs import ItemIndex, PairTable, build_preference_data, cap_per_user, leak_free, shuffled
from datamodules.sources import find_files, read_all


class RedditTLDRDataModule(HubPreferenceDataModule):
    """The ``comparisons`` of ``openai/summarize_from_feedback``, one user per labelling worker.

    The prompt is the post (``info.post``, or ``info.article`` for the news rows); chosen and
    rejected are ``summaries[choice].text`` and the other summary. The paper's split: workers with
    pairs in both the train and the validation split; the ``drop_fewest`` of them with the fewest
    pairs are dropped; the rest are shuffled (``seed``) and halved into seen and unseen. Seen
    workers train on at most ``seen_train_cap`` of their train-split pairs, unseen workers on at
    most ``unseen_train_cap``; all are tested on their validation-split pairs (minus any whose post
    also occurs in a training pair).

    Args:
        source: the Hub data set id, or a local directory holding ``comparisons`` train and validation
            files (``.jsonl``/``.json``/``.parquet``) in the upstream schema.
        revision: the Hub revision (a commit hash pins the data).
        seed: seed of the worker shuffle and of the capped subsamples.
        seen_train_cap: train pairs per seen worker (150 in the paper).
        unseen_train_cap: few-shot pool per unseen worker (50 in the paper; 100 in the shots sweep).
        drop_fewest: how many workers with the fewest pairs are dropped (2 in the paper).
        **kwargs: the loading arguments of ``EmbeddedPreferenceDataModule`` (batch sizes, shuffling,
            the validation hold-out, the cache and the embedder).
    """

    allow_patterns = ["*comparisons*"]

    def __init__(
        self,
        source: str = "openai/summarize_from_feedback",
        revision: str = "main",
        seed: int = 0,
        seen_train_cap: int | None = 150,
        unseen_train_cap: int | None = 50,
        drop_fewest: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(source=source, revision=revision, seed=seed, **kwargs)
        self.seen_train_cap, self.unseen_train_cap, self.drop_fewest = seen_train_cap, unseen_train_cap, drop_fewest

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        root = self.source_root[0]
        items, table = ItemIndex(), PairTable()
        for split in ("train", "validation"):
            for record in read_all(find_files(root, "comparisons", split)):
                info, summaries, choice = record["info"], record["summaries"], int(record["choice"])
                post = info.get("post") or info.get("article")
                chosen, rejected = summaries[choice]["text"], summaries[1 - choice]["text"]
                if not post or not chosen or chosen == rejected:
                    continue  # nothing to compare
                messages = [{"role": "user", "content": post}]
                group = str(info.get("id") or post)
                table.append(
                    str(record["worker"]), items.add(messages, chosen), items.add(messages, rejected), group, split
                )
        return items.items, table.to_json()

    def plan_splits(self, table: dict[str, Any]) -> None:
        self.report_fixed_split(table, self.split_rows(table), "prompt: the paper's posts")

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        return build_preference_data(table, embeddings, reference_head, self.split_rows(table),
                                     self.response_lengths())

    def split_rows(self, table: dict[str, Any]) -> dict[str, np.ndarray]:
        """The table rows of each role (the paper's split, from the table alone)."""
        users = np.asarray(table["user"], dtype=object)
        groups = np.asarray(table["group"], dtype=object)
        source = np.asarray(table["source"], dtype=object)
        in_both = set(users[source == "train"]) & set(users[source == "validation"])
        counts = Counter(u for u in users if u in in_both)
        fewest = sorted(counts, key=lambda u: (counts[u], u))[: self.drop_fewest]
        workers = shuffled(set(counts) - set(fewest), self.seed)
        seen, unseen = workers[: len(workers) // 2], workers[len(workers) // 2 :]
        train, validation = source == "train", source == "validation"
        is_seen, is_unseen = np.isin(users, seen), np.isin(users, unseen)
        role_rows = {
            "seen_train": cap_per_user(np.flatnonzero(is_seen & train), users, self.seen_train_cap, self.seed),
            "seen_test": np.flatnonzero(is_seen & validation),
            "unseen_pool": cap_per_user(np.flatnonzero(is_unseen & train), users, self.unseen_train_cap, self.seed),
            "unseen_test": np.flatnonzero(is_unseen & validation),
        }
        leak_free(role_rows, groups)
        return role_rows
