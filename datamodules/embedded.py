"""The base of the real data sets: rows of text read once, embedded into a feature cache, split.

``prepare_data`` (rank 0, once) reads the source, records the texts and a JSON table of the rows in
the cache, and embeds what is missing; ``setup``/``load`` only read the cache. An embedding job
(``connect(DataRequest(embed=True))``, which the CLI does for ``lightning predict`` with an
``EmbeddingModule``) leaves the embedding to the Trainer: the predict loader yields the missing
shards and the module's ``CacheWriter`` stores them.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import PreferenceData, PreferenceDataModule
from datamodules.sources import resolve
from lore_pl.data.embedder import EmbedderSpec
from lore_pl.data.feature_cache import FeatureCache
from lore_pl.errors import LoreDataWarning


class EmbeddedPreferenceDataModule(PreferenceDataModule):
    """A data set of texts, embedded by ``embedder`` into ``cache_dir``.

    Subclasses implement ``source_revision`` (what identifies the raw data), ``read_source`` (the
    items to embed and a JSON table of rows) and ``build`` (the splits, from the table and the
    embeddings). ``source_options`` lists the reading options that change the items or table.

    Args:
        cache_dir: where embeddings are cached (one subdirectory per data set revision and embedder).
        embedder: the model that embeds the texts (``lore_pl.data.embedder.EmbedderSpec``, or a dict of its fields).
        shard_size: texts per cache shard (one predict batch; the unit an interrupted job resumes at).
        progress: show a progress bar while embedding in-process.
        **kwargs: the loading arguments of ``PreferenceDataModule`` (batch sizes, shuffling, validation hold-out).
    """

    def __init__(
        self,
        cache_dir: str = "cache/features",
        embedder: EmbedderSpec | None = None,
        shard_size: int = 1024,
        progress: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.cache_dir = cache_dir
        self.embedder_spec = EmbedderSpec.coerce(embedder)  # a plain dict in Python, as in a config
        self.shard_size = shard_size
        self.progress = progress
        self._cache: FeatureCache | None = None
        self._response_lengths: np.ndarray | None = None

    # ----------------------------------------------------------------------- for subclasses
    def source_revision(self) -> str:
        """What identifies the raw data: a Hub commit or a hash of the local files."""
        raise NotImplementedError

    def source_options(self) -> dict[str, Any]:
        """Options that change the items or the table (they key the cache)."""
        return {}

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        """(items to embed, each ``[messages, response]``; a JSON-able table of the rows)."""
        raise NotImplementedError

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        """The protocol's splits from the table and the items' embeddings ``[num_items, d]``."""
        raise NotImplementedError

    def plan_splits(self, table: dict[str, Any]) -> None:
        """Work out (and print) how the table's rows will be split, from the table alone. Called
        before anything is embedded, so that a split that cannot work fails in seconds, not after
        the embedding; data modules that plan their splits override it (it raises ``LoreDataError``)."""

    def report_fixed_split(self, table: dict[str, Any], role_rows: dict[str, np.ndarray], mode: str) -> None:
        """Check and print the split a data set fixes (its paper's), before anything is embedded."""
        from datamodules.splits import PairRows, fixed_plan, say

        rows = PairRows.from_table(table)
        plan = fixed_plan(rows, role_rows, mode, type(self).__name__)
        say(plan.describe(rows, type(self).__name__, mode))

    def response_lengths(self) -> np.ndarray:
        """Each cached item's response length in characters (``[num_items]``), read once from the cache."""
        if self._response_lengths is None:
            self._response_lengths = np.asarray([len(response) for _, response in self.feature_cache.items()],
                                                dtype=np.float32)
        return self._response_lengths

    @property
    def embedder(self) -> str:
        return self.embedder_spec.identity()

    @property
    def embedder_weights(self) -> str:
        return self.feature_cache.weights_digest()

    # ------------------------------------------------------------------------------- cache
    @property
    def feature_cache(self) -> FeatureCache:
        if self._cache is None:
            from lore_pl.data.embedder import template_id

            key = {
                "dataset": type(self).__name__,
                "revision": self.source_revision(),
                "options": self.source_options(),
                "embedder": self.embedder_spec.cache_key(template_id(self.embedder_spec)),
            }
            self._cache = FeatureCache(self.cache_dir, key, name=type(self).__name__)
        return self._cache

    def _embedding_job(self) -> bool:
        return self.request.embed

    def prepare_data(self) -> None:
        cache = self.feature_cache
        if cache.is_complete():
            damaged = cache.verify(checksums=True)
            if not damaged:
                return
            # rebuild rather than stop: the items are known, only the damaged shards are embedded again
            rank_zero_warn(
                f"feature cache {cache.directory}: re-embedding {len(damaged)} damaged shard(s): "
                + "; ".join(f"{cache.shard_path(i).name}: {what}" for i, what in list(damaged.items())[:3]),
                category=LoreDataWarning,
            )
            cache.invalidate(list(damaged))
        items, table = self.read_source()
        self.plan_splits(table)  # before any embedding: an impossible split stops here
        cache.initialize(items, self.shard_size)
        cache.write_table(table)
        if self._embedding_job():
            return  # the predict loop embeds the missing shards
        from lore_pl.data.embedder import TextEmbedder
        from lore_pl.data.feature_cache import embed_missing

        embed_missing(cache, TextEmbedder(self.embedder_spec), progress=self.progress)

    def load(self) -> PreferenceData:
        cache = self.feature_cache
        if self.trainer is None or not cache.is_complete():
            # single-process use (which also checks and repairs the cache); under a Trainer this
            # ran on rank 0 already
            self.prepare_data()
        embeddings, head = cache.load()
        table = cache.table()
        return self.build(table, embeddings, head)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self._embedding_job():
            return  # embedding: the cache is being filled, there are no splits to load yet
        super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        if self._embedding_job():
            from lore_pl.data.feature_cache import MissingShards

            return MissingShards(self.feature_cache).loader()
        return super().predict_dataloader()


class HubPreferenceDataModule(EmbeddedPreferenceDataModule):
    """An embedded data set whose raw files are ``source``: a Hugging Face data set id, at ``revision``,
    or a local copy; ``seed`` draws its split of users and pairs. Subclasses give their defaults of all
    three and name the files to download in ``allow_patterns``."""

    allow_patterns: ClassVar[list[str] | None] = None  # the files to download (None: all)

    def __init__(self, source: str, revision: str = "main", seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source, self.revision, self.seed = source, revision, seed

    @cached_property
    def source_root(self) -> tuple[Path, str]:
        """(local root, revision) of the source, resolved (and downloaded) once."""
        return resolve(self.source, self.revision, allow_patterns=self.allow_patterns)

    def source_revision(self) -> str:
        return self.source_root[1]
