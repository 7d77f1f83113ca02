"""Filling a ``FeatureCache``: under ``lightning predict`` (any number of devices) or in-process."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lore_pl.feature_cache import FeatureCache


class MissingShards(Dataset):
    """One element per shard still to embed: ``{"shard": index, "items": [...]}``."""

    def __init__(self, cache: FeatureCache, items: list[Any] | None = None) -> None:
        self.cache = cache
        self.items = cache.items() if items is None else items
        self.shards = cache.missing_shards()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, stop = self.cache.shard_range(self.shards[index])
        return {"shard": self.shards[index], "items": self.items[start:stop]}

    def loader(self) -> DataLoader:
        # batch_size=None: each element is already a batch (one shard); nothing to collate.
        return DataLoader(self, batch_size=None, collate_fn=lambda element: element)


class CacheWriter(BasePredictionWriter):
    """Writes each predicted shard into the data module's ``feature_cache`` as it finishes (atomically),
    then, on rank 0 once all ranks are done, the reference head and the completed manifest."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The shards are on disk as they finish; keeping every embedding in memory too would need
        # the whole data set's features in RAM.
        trainer.predict_loop.return_predictions = False

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        trainer.datamodule.feature_cache.write_shard(prediction["shard"], prediction["embeddings"])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        cache = trainer.datamodule.feature_cache
        if trainer.is_global_zero and pl_module.embedder is not None:  # None: the cache was complete already
            head = pl_module.embedder.reference_head
            if head is not None:
                cache.write_reference_head(head)
            cache.finalize()
        trainer.strategy.barrier()


def embed_missing(cache: FeatureCache, embedder, progress: bool = True) -> int:
    """Embed the cache's missing shards in this process with ``embedder`` (a ``TextEmbedder``) and
    complete the cache. Returns the number of shards embedded."""
    shards = MissingShards(cache)
    manifest = cache.manifest()
    total = sum(cache.shard_range(s)[1] - cache.shard_range(s)[0] for s in shards.shards)
    with tqdm(total=total, desc=f"embedding {manifest['num_items']} texts", unit="text", disable=not progress) as bar:
        for element in shards:
            cache.write_shard(element["shard"], embedder(element["items"]))
            bar.update(len(element["items"]))
    head = embedder.reference_head
    if head is not None:
        cache.write_reference_head(head)
    cache.finalize()
    return len(shards)
