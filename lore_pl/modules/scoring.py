"""``lightning predict``: users' rewards of candidate responses, from a file of their embeddings
(``ScoringModule``) or of their text (``TextScoringModule``)."""

from __future__ import annotations

import csv
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lore_pl.data.atomic import write_atomic
from lore_pl.data.basis_file import load_basis, resolve_basis_path
from lore_pl.data.outputs import OutputKind, check_output, claim_outputs, first_line_starts
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel
from lore_pl.modules.distributed import release_process_group_at_exit

#: the CSVs ``lightning predict`` writes (either writer), known by their header lines
SCORE_CSV = OutputKind("lightning predict", first_line_starts("candidate,", "line,user_id,reward"),
                       "a score CSV (header 'candidate,...' or 'line,user_id,reward')")


class _ScoreCsvWriter(BasePredictionWriter):
    """Claims the output CSV before anything is scored (``lore_pl.data.outputs``: not a directory, not an
    input of the command, not a file another command wrote unless ``overwrite``; one writer at a time),
    writes it atomically at the end of prediction and lets it go."""

    def __init__(self, output: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)
        self.overwrite = overwrite
        self._claim = ExitStack()
        self._inputs: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            inputs = [pl_module.hparams.get("basis_path"), getattr(trainer.datamodule, "path", None)]
            self._claim.enter_context(claim_outputs([self.output], SCORE_CSV, inputs, self.overwrite))
            self._inputs = inputs

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._claim.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._claim.close()

    def _write(self, write_csv) -> None:
        check_output(self.output, SCORE_CSV, self._inputs, self.overwrite)  # still ours to replace
        write_atomic(self.output, write_csv)


class ScoreWriter(_ScoreCsvWriter):
    """At the end of prediction, write ``candidate,<user id>,...`` rows: every user's reward of every
    candidate (row order of the candidate file). Written atomically.

    Args:
        output: the CSV file to write.
        overwrite: replace an existing file there that is not a score CSV (never an input of the command).
    """

    def __init__(self, output: str = "scores.csv", overwrite: bool = False) -> None:
        super().__init__(output, overwrite)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        index = torch.cat([batch["index"] for batch in batches]).cpu()
        scores = torch.cat([batch["scores"] for batch in batches]).cpu()[torch.argsort(index)]
        rows = zip(torch.sort(index).values.tolist(), scores.tolist())

        def write_csv(stream) -> None:
            writer = csv.writer(stream)
            writer.writerow(["candidate", *pl_module.user_ids])
            writer.writerows([row, *(f"{value:.6g}" for value in values)] for row, values in rows)

        self._write(write_csv)
        print(f"wrote {scores.shape[0]} candidates x {scores.shape[1]} users: {self.output}", flush=True)


class ScoringModule(LightningModule):
    """Scores candidate embeddings for named users with a learned basis (no training).

    Args:
        basis_path: a ``BasisModule`` or ``FewShotModule`` checkpoint, an exported ``.safetensors``, or
            a run directory (its ``basis.safetensors``).
        users: the users to score for (``null``: every user the basis file knows).
        output: the CSV file the scores go to (``candidate,<user id>,...``, written by ``ScoreWriter``).
        overwrite: replace an existing ``output`` that is not a score CSV (``lightning predict --overwrite``);
            an input of the command (the basis, the run directory's files, the candidates) never.
    """

    def __init__(self, basis_path: str, users: list[str] | None = None, output: str = "scores.csv",
                 overwrite: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.user_ids: list[str] = []

    def setup(self, stage: str) -> None:
        release_process_group_at_exit()
        if self.model is not None:
            return
        model = load_basis(resolve_basis_path(self.hparams.basis_path)).to_model()
        users = self.hparams.users or model.user_ids
        if not users:
            raise LoreDataError(f"{self.hparams.basis_path} names no users to score for")
        unknown = [user for user in users if user not in model.user_ids]
        if unknown:
            raise LoreDataError(f"unknown user(s) {unknown[:5]}: not among the {model.num_users} users of "
                           f"{self.hparams.basis_path}")
        position = {user: row for row, user in enumerate(model.user_ids)}
        rows = torch.tensor([position[user] for user in users])
        self.model, self.user_ids = model, list(users)
        self.register_buffer("heads", model.heads()[:, rows].contiguous())  # [d, users]: V w_u, on the device

    def configure_callbacks(self):
        return [ScoreWriter(self.hparams.output, self.hparams.overwrite)]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        embeddings = batch["embeddings"]
        if embeddings.shape[1] != self.heads.shape[0]:
            raise LoreDataError(
                f"candidate embeddings have d={embeddings.shape[1]}, the basis has d={self.heads.shape[0]}"
            )
        return {"index": batch["index"], "scores": embeddings.float() @ self.heads}


class TextScoreWriter(_ScoreCsvWriter):
    """At the end of prediction, write ``line,user_id,reward`` rows (a row of the input file per
    user it was scored for, in the file's order), atomically.

    Args:
        output: the CSV file to write.
        overwrite: replace an existing file there that is not a score CSV (never an input of the command).
    """

    def __init__(self, output: str = "text_scores.csv", overwrite: bool = False) -> None:
        super().__init__(output, overwrite)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not trainer.is_global_zero:
            return  # every rank scores every row (the sampler does not shard them): one writes
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        lines = torch.cat([batch["line"] for batch in batches]).cpu()
        users = torch.cat([batch["user"] for batch in batches]).cpu()
        rewards = torch.cat([batch["reward"] for batch in batches]).cpu()
        order = torch.argsort(lines, stable=True)  # within a line, the users' order stays
        names = pl_module.user_ids

        def write_csv(stream) -> None:
            writer = csv.writer(stream)
            writer.writerow(["line", "user_id", "reward"])
            writer.writerows([line, names[user], f"{reward:.6g}"] for line, user, reward in
                             zip(lines[order].tolist(), users[order].tolist(), rewards[order].tolist()))

        self._write(write_csv)
        print(f"wrote {rewards.shape[0]} rewards of {torch.unique(lines).numel()} responses: {self.output}",
              flush=True)


class TextScoringModule(LightningModule):
    """Scores responses given as text (``datamodules.ResponseFileDataModule``) with a learned basis:
    each ``[messages, response]`` is embedded by the embedder the basis was trained on, as in
    training, then rewarded ``e . V w_u`` for the row's user, or for ``users`` when it names none.

    Args:
        basis_path: a run directory (its ``basis.safetensors``), a basis file or a checkpoint, of a
            basis trained on a text embedder's features.
        users: the users to score rows without a user id for (``null``: every user of the basis).
        output: the CSV file of ``line,user_id,reward`` rows (``TextScoreWriter``).
        batch_size: texts per forward pass of the embedder (``null``: the recorded embedder's default).
        overwrite: replace an existing ``output`` that is not a score CSV (``lightning predict --overwrite``);
            an input of the command (the basis, the run directory's files, the responses) never.
    """

    def __init__(self, basis_path: str, users: list[str] | None = None, output: str = "text_scores.csv",
                 batch_size: int | None = None, overwrite: bool = False) -> None:
        super().__init__()
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise LoreDataError(f"batch_size must be a number of texts >= 1 (null: the embedder's), got {batch_size}")
        self.save_hyperparameters()
        self.embedder = None
        self.user_ids: list[str] = []
        self._column: dict[str, int] = {}

    def setup(self, stage: str) -> None:
        release_process_group_at_exit()
        if self.embedder is not None:
            return
        basis_path = self.hparams.basis_path
        reward_model = PersonalRewardModel.from_run(basis_path, batch_size=self.hparams.batch_size)
        self.user_ids = list(reward_model.user_ids)
        self._column = {user: column for column, user in enumerate(self.user_ids)}
        users = list(dict.fromkeys(self.hparams.users or self.user_ids))  # a user named twice is scored once
        if not users:
            raise LoreDataError(f"{basis_path} names no users to score for")
        unknown = [user for user in users if user not in self._column]
        if unknown:
            raise LoreDataError(
                f"unknown user(s) {unknown[:5]}: not among the {len(self.user_ids)} users of {basis_path}"
            )
        self.register_buffer("default_columns", torch.tensor([self._column[user] for user in users]))
        # check the rows' users before any text is embedded, where the data module can list them
        named = getattr(self.trainer.datamodule if self._trainer is not None else None, "named_users", None)
        for user, line in (named() if callable(named) else {}).items():
            self._check_user(user, line)
        self.register_buffer("heads", reward_model.model.heads().detach().contiguous())  # [d, C]
        self.embedder = reward_model.text_embedder  # a submodule: the Trainer moves it to the device

    def _check_user(self, user: str, line: int) -> None:
        if user not in self._column:
            datamodule = getattr(self._trainer, "datamodule", None)
            path = getattr(datamodule, "path", "the response file")
            field = getattr(datamodule, "columns", {}).get("user_id", "user_id")
            raise LoreDataError(f"{path}: line {line}: field {field!r}: unknown user {user!r}, not among the "
                                f"{len(self.user_ids)} users of {self.hparams.basis_path}")

    def configure_callbacks(self):
        return [TextScoreWriter(self.hparams.output, self.hparams.overwrite)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        rows, columns = [], []
        for row, (line, user) in enumerate(zip(batch["line"].tolist(), batch["users"])):
            if user is None:
                wanted = self.default_columns
            else:
                self._check_user(user, line)
                wanted = self.default_columns.new_tensor([self._column[user]])
            rows.append(torch.full_like(wanted, row))
            columns.append(wanted)
        rows, columns = torch.cat(rows), torch.cat(columns)
        embeddings = self.embedder(batch["items"]).to(self.heads.device)
        if embeddings.shape[1] != self.heads.shape[0]:
            raise LoreDataError(f"the embedder gives d={embeddings.shape[1]}, the basis has d={self.heads.shape[0]}")
        rewards = (embeddings @ self.heads)[rows, columns]  # [rows, users] first: no [pairs, d] copy
        return {"line": batch["line"][rows.to(batch["line"].device)], "user": columns, "reward": rewards}
