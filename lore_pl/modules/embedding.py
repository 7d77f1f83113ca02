"""The embedding job for ``lightning predict``: texts of a data set into its feature cache."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lore_pl.data.embedder import TextEmbedder
from lore_pl.data.preferences import DataRequest
from lore_pl.errors import LoreDataError
from lore_pl.modules.distributed import release_process_group_at_exit


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


class EmbeddingModule(LightningModule):
    """Each predict batch is one cache shard of items; its ``CacheWriter`` stores what it returns.

    The embedder's settings come from the data module (``datamodule.embedder_spec``), the one
    place that also keys the cache that ``fit`` reads. The data module is told to serve the
    missing shards (``data_request``: an embedding job), which the CLI does before ``prepare_data``.
    """

    data_request = DataRequest(embed=True)

    def __init__(self) -> None:
        super().__init__()
        self.embedder: TextEmbedder | None = None

    def setup(self, stage: str) -> None:
        release_process_group_at_exit()
        datamodule = self.trainer.datamodule
        spec = getattr(datamodule, "embedder_spec", None)
        if spec is None:
            raise LoreDataError(
                "EmbeddingModule needs a data module with an `embedder_spec` (an EmbeddedPreferenceDataModule)"
            )
        datamodule.connect(self.data_request)
        if datamodule.feature_cache.is_complete():
            rank_zero_info(f"feature cache {datamodule.feature_cache.directory} is complete: nothing to embed")
            return  # no need to load an 8B model to embed nothing
        if self.embedder is None:
            self.embedder = TextEmbedder(spec)
        if self.trainer.is_global_zero:
            datamodule.feature_cache.record_weights_digest(self.embedder.weights_digest())

    def configure_callbacks(self):
        return [CacheWriter()]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"shard": batch["shard"], "embeddings": self.embedder(batch["items"])}
