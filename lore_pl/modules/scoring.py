"""``lightning predict``: users' rewards of candidate responses, from a file of their embeddings
(``ScoringModule``) or of their text (``TextScoringModule``)."""

from __future__ import annotations

import csv
import json
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader

from lore_pl.data.atomic import AtomicTarget, write_atomic
from lore_pl.data.basis_file import check_user_id, load_basis, resolve_basis_path
from lore_pl.data.outputs import OutputKind, check_output, claim_outputs, first_line_starts, json_field_is
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel
from lore_pl.modules.distributed import release_process_group_at_exit

#: the CSVs ``lightning predict`` writes (either writer), known by their header lines
SCORE_CSV = OutputKind("lightning predict", first_line_starts("candidate,", "line,user_id,reward"),
                       "a score CSV (header 'candidate,...' or 'line,user_id,reward')")
#: the mark of ``ScoreWriter``'s columnar files: the Parquet file's metadata, the ``.npy``'s index file
SCORES_FORMAT = "lore-pl-scores/1"


def index_path(scores: Path) -> Path:
    """The index file of a ``.npy`` score table: ``scores.npy`` -> ``scores.index.json``."""
    return scores.with_suffix(".index.json")


def is_score_parquet(path: Path) -> bool:
    """A Parquet file whose metadata carries ``SCORES_FORMAT`` (its footer is read, nothing else)."""
    try:
        import pyarrow.parquet as pq

        metadata = pq.read_metadata(path).metadata or {}
    except Exception:  # not Parquet, unreadable, or no pyarrow: not a file this command wrote
        return False
    return metadata.get(b"format") == SCORES_FORMAT.encode()


def is_score_npy(path: Path) -> bool:
    """A ``.npy`` score table (its index file says so) or such an index file."""
    index = path if path.name.endswith(".index.json") else index_path(path)
    return json_field_is("format", SCORES_FORMAT)(index)


SCORE_PARQUET = OutputKind("lightning predict", is_score_parquet, f"a score Parquet file (metadata {SCORES_FORMAT})")
SCORE_NPY = OutputKind("lightning predict", is_score_npy, f"a score .npy table and its index file ({SCORES_FORMAT})")


class _ScoreCsvWriter(BasePredictionWriter):
    """Claims the outputs (``paths``, of ``kind``) before anything is scored (``lore_pl.data.outputs``: not a
    directory, not an input of the command, not a file another command wrote unless ``overwrite``; one
    writer at a time) and lets them go when prediction ends; the CSV writers write theirs atomically at
    the end of prediction (``_write``)."""

    def __init__(self, output: str, overwrite: bool = False, write_interval: str = "epoch") -> None:
        super().__init__(write_interval=write_interval)
        self.output = Path(output)
        self.overwrite = overwrite
        self.kind = SCORE_CSV
        self.paths = [self.output]
        self._claim = ExitStack()
        self._inputs: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            inputs = [pl_module.hparams.get("basis_path"), getattr(trainer.datamodule, "path", None)]
            self._claim.enter_context(claim_outputs(self.paths, self.kind, inputs, self.overwrite))
            self._inputs = inputs

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._claim.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._claim.close()

    def _write(self, write_csv) -> None:
        check_output(self.output, self.kind, self._inputs, self.overwrite)  # still ours to replace
        write_atomic(self.output, write_csv)


class _CsvScores:
    """``candidate,<user id>,...`` rows, appended batch by batch."""

    def __init__(self, path: str, users: list[str]) -> None:
        self.stream = open(path, "w", newline="")  # noqa: SIM115 - closed by close(), after the last batch
        self.writer = csv.writer(self.stream)
        self.writer.writerow(["candidate", *users])

    def write(self, index: Tensor, scores: Tensor) -> None:
        self.writer.writerows([row, *(f"{value:.6g}" for value in values)]
                              for row, values in zip(index.tolist(), scores.tolist()))

    def close(self) -> None:
        self.stream.close()


class _ParquetScores:
    """A Parquet table: an int64 ``candidate`` column and a float32 column per user, written in row groups of
    about ``GROUP_BYTES`` (batches are gathered up to that, so small batches do not make tiny groups)."""

    GROUP_BYTES = 1 << 25

    def __init__(self, path: str, users: list[str]) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise LoreDataError("a .parquet output needs pyarrow (pip install pyarrow); or write .npy or .csv"
                                ) from None
        self.pa = pa
        self.schema = pa.schema([("candidate", pa.int64()), *((user, pa.float32()) for user in users)],
                                metadata={"format": SCORES_FORMAT, "users": json.dumps(users)})
        # float scores hardly compress and are nearly all distinct: dictionary encoding (pyarrow's default) and
        # per-column statistics made the write 5x slower and the file 1.5x larger, for nothing
        self.writer = pq.ParquetWriter(path, self.schema, compression="none", use_dictionary=False,
                                       write_statistics=["candidate"])
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_bytes = 0

    def write(self, index: Tensor, scores: Tensor) -> None:
        self.pending.append((index.numpy().astype(np.int64), scores.numpy()))
        self.pending_bytes += scores.numel() * 4
        if self.pending_bytes >= self.GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        index = np.concatenate([part[0] for part in self.pending])
        by_user = np.ascontiguousarray(np.concatenate([part[1] for part in self.pending]).T)  # a row per column
        self.pending, self.pending_bytes = [], 0
        columns = [self.pa.array(index), *(self.pa.array(scores) for scores in by_user)]
        self.writer.write_table(self.pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        self._flush()
        self.writer.close()


class _NpyScores:
    """A float32 ``[candidates, users]`` ``.npy`` (row i: candidate i) filled batch by batch through a
    memory map, and its index file (JSON: the users in column order, the number of candidates)."""

    def __init__(self, path: str, index: str, users: list[str], count: int, name: str) -> None:
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, len(users)))
        self.index, self.users, self.name = index, users, name
        self.written = np.zeros(count, dtype=bool)

    def write(self, index: Tensor, scores: Tensor) -> None:
        rows = index.numpy()
        self.array[rows] = scores.numpy()
        self.written[rows] = True

    def close(self) -> None:
        self.array.flush()
        del self.array
        if not self.written.all():
            raise LoreDataError(f"{self.name}: only {int(self.written.sum())} of the {self.written.size} candidates "
                                "were scored in this process; nothing was written")
        with open(self.index, "w", encoding="utf-8") as stream:
            json.dump({"format": SCORES_FORMAT, "scores": self.name, "users": self.users,
                       "candidates": int(self.written.size)}, stream)


class ScoreWriter(_ScoreCsvWriter):
    """Writes every user's reward of every candidate as the batches are scored, in the format of the
    output's suffix: ``.parquet`` (a ``candidate`` column and a float32 column per user), ``.npy`` (a
    float32 ``[candidates, users]`` table, row i candidate i, and ``NAME.index.json`` naming the users
    in column order), anything else a CSV (``candidate,<user id>,...``). Nothing is held beyond a batch
    (``trainer.predict`` returns no predictions).

    The output (and the index file) is claimed before anything is scored (``lore_pl.data.outputs``:
    not a directory, not an input of the command, not a file another command wrote unless
    ``overwrite``; one writer at a time); the batches go to a temporary file renamed into place when
    prediction ends, so a failure or a kill leaves no half-written output and an earlier one unchanged.

    Args:
        output: the file to write.
        overwrite: replace an existing file there that is not one this command wrote (never an input of the command).
    """

    def __init__(self, output: str = "scores.csv", overwrite: bool = False) -> None:
        super().__init__(output, overwrite, write_interval="batch")
        self.kind = {".parquet": SCORE_PARQUET, ".npy": SCORE_NPY}.get(self.output.suffix.lower(), SCORE_CSV)
        self.paths = [self.output, index_path(self.output)] if self.kind is SCORE_NPY else [self.output]
        self._targets: list[AtomicTarget] = []
        self._sink: _CsvScores | _ParquetScores | _NpyScores | None = None
        self._count = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        trainer.predict_loop.return_predictions = False  # the scores go to the file, not into memory
        super().setup(trainer, pl_module, stage)

    def on_predict_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return  # every rank scores every row (the sampler does not shard them): one writes
        self._targets = [AtomicTarget(path) for path in self.paths]
        temporary = [target.temporary for target in self._targets]
        users = list(pl_module.user_ids)
        if self.kind is SCORE_PARQUET:
            self._sink = _ParquetScores(temporary[0], users)
        elif self.kind is SCORE_NPY:
            loaders = trainer.predict_dataloaders
            loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders)
            count = sum(len(loader.dataset) for loader in loaders)
            self._sink = _NpyScores(temporary[0], temporary[1], users, count, str(self.output))
        else:
            self._sink = _CsvScores(temporary[0], users)
        self._count = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if self._sink is not None:
            self._sink.write(prediction["index"].cpu(), prediction["scores"].float().cpu())
            self._count += prediction["index"].shape[0]

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._sink is None:
            return
        sink, self._sink = self._sink, None
        sink.close()
        for path in self.paths:
            check_output(path, self.kind, self._inputs, self.overwrite)  # still ours to replace
        for target in self._targets:
            target.commit()
        self._targets = []
        print(f"wrote {self._count} candidates x {len(pl_module.user_ids)} users: {self.output}", flush=True)

    def _discard(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            with suppress(Exception):  # a sink that cannot close: its temporary file goes anyway
                sink.close()
        for target in self._targets:
            target.discard()
        self._targets = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._discard()  # nothing left after a committed write; a failed one leaves no temporary file
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._discard()
        super().on_exception(trainer, pl_module, exception)


def chosen_users(users: object, known: list[str], basis_path: object) -> list[str]:
    """The ``users`` option (null: every user of the basis): user id strings the basis knows, each once (a
    user listed twice is scored once); a ``LoreDataError`` naming the option and the user otherwise."""
    if users is None:
        users = list(known)
    if isinstance(users, str) or not isinstance(users, (list, tuple)):
        raise LoreDataError(f"users must be a list of user ids (or null for every user), got {users!r:.60}")
    for number, user in enumerate(users):
        check_user_id(user, f"users[{number}]")
    if not users:
        raise LoreDataError(f"{basis_path} names no users to score for")
    named = set(known)
    unknown = [user for user in users if user not in named]
    if unknown:
        raise LoreDataError(f"users: unknown user(s) {unknown[:5]}: not among the {len(known)} users of {basis_path}")
    return list(dict.fromkeys(users))


class ScoringModule(LightningModule):
    """Scores candidate embeddings for named users with a learned basis (no training).

    Args:
        basis_path: a ``BasisModule`` or ``FewShotModule`` checkpoint, an exported ``.safetensors``, or
            a run directory (its ``basis.safetensors``).
        users: the users to score for (``null``: every user the basis file knows).
        output: the file the scores go to (``ScoreWriter``): ``.parquet``, ``.npy`` (plus ``NAME.index.json``)
            or a CSV (any other suffix: ``candidate,<user id>,...``), written batch by batch.
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
        users = chosen_users(self.hparams.users, model.user_ids, self.hparams.basis_path)
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
        users = chosen_users(self.hparams.users, self.user_ids, basis_path)
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
