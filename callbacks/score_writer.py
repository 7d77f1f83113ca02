"""Writes the scores of ``lightning predict`` with a ``ScoringModule`` to a CSV file."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lore_pl.atomic import write_atomic


class ScoreWriter(BasePredictionWriter):
    """At the end of prediction, write ``candidate,<user id>,...`` rows: every user's reward of every
    candidate (row order of the candidate file). Written atomically.

    Args:
        output: the CSV file to write.
    """

    def __init__(self, output: str = "scores.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        index = torch.cat([batch["index"] for batch in batches]).cpu()
        scores = torch.cat([batch["scores"] for batch in batches]).cpu()[torch.argsort(index)]
        rows = zip(torch.sort(index).values.tolist(), scores.tolist())

        def write_csv(stream) -> None:
            writer = csv.writer(stream)
            writer.writerow(["candidate", *pl_module.user_ids])
            writer.writerows([row, *(f"{value:.6g}" for value in values)] for row, values in rows)

        write_atomic(self.output, write_csv)
        print(f"wrote {scores.shape[0]} candidates x {scores.shape[1]} users: {self.output}", flush=True)
