"""After the basis is trained: adapt the unseen users and report the protocol's four numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.base import PreferenceDataModule
from lore_pl import functional as LF
from lore_pl.basis import BasisModule
from lore_pl.errors import LoreDataError
from lore_pl.export import BasisFile, save_basis
from lore_pl.atomic import write_json_atomic
from lore_pl.metrics import PerUserAccuracy
from lore_pl.preferences import PreferenceSplit

#: (result key, data role, label in the printed table)
PROTOCOL_ROWS = (
    ("seen/train_acc", "seen_train", "seen users, train pairs"),
    ("seen/test_acc", "seen_test", "seen users, unseen prompts"),
    ("unseen/fewshot_acc", "unseen_pool", "unseen users, few-shot pairs"),
    ("unseen/test_acc", "unseen_test", "unseen users, unseen prompts"),
)


def accuracy(logits: Tensor, split: PreferenceSplit) -> tuple[float, float]:
    """(mean over users, std over users) of per-user accuracy."""
    metric = PerUserAccuracy(split.num_users)
    metric.update(logits.detach().cpu(), split.users.cpu())
    result = metric.compute()
    return float(result["mean"]), float(result["std"])


@torch.no_grad()
def evaluate_protocol(
    module: BasisModule,
    datamodule: PreferenceDataModule,
    shots: int | None = 10,
    shot_seed: int = 0,
    steps: int = 500,
    lr: float = 0.1,
    weight_init: Literal["randn", "zeros", "population"] = "randn",
    prior_strength: float = 0.0,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """The four protocol accuracies (each with its std over users), and the oracle's where known.

    The unseen users are adapted to the pruned basis with ``fit_user_weights`` on ``shots`` pairs
    each (drawn with ``shot_seed``); their few-shot accuracy is measured on those pairs.
    """
    device = torch.device(device) if device is not None else module.device
    basis, seen_weights = (tensor.to(device) for tensor in module.kept_basis())
    tau = float(module.hparams.tau)
    evaluated: dict[str, tuple[PreferenceSplit, Tensor]] = {}
    for role in ("seen_train", "seen_test"):
        if datamodule.has_split(role):
            split = datamodule.split(role)
            logits = LF.pair_logits(split.features.to(device), split.users.to(device), basis, seen_weights, tau)
            evaluated[role] = (split, logits)
    if datamodule.has_split("unseen_pool"):
        pool = datamodule.split("unseen_pool")
        generator = torch.Generator().manual_seed(shot_seed)
        shot_split = pool if shots is None else pool.subset(LF.sample_shots(pool.users, shots, generator), "unseen_shots")
        projected = LF.project(shot_split.features.to(device), basis)
        prior = LF.population_logits(seen_weights)
        init = LF.initial_user_logits(pool.num_users, basis.shape[1], weight_init, generator, prior)
        user_logits = LF.fit_user_weights(projected, shot_split.users.to(device), init, steps=steps, lr=lr, tau=tau,
                                       prior_logits=prior, prior_strength=prior_strength)
        unseen_weights = LF.simplex_weights(user_logits)
        evaluated["unseen_pool"] = (shot_split, LF.projected_logits(projected, shot_split.users.to(device), unseen_weights, tau))
        if datamodule.has_split("unseen_test"):
            test = datamodule.split("unseen_test")
            logits = LF.pair_logits(test.features.to(device), test.users.to(device), basis, unseen_weights, tau)
            evaluated["unseen_test"] = (test, logits)

    results: dict[str, float | int] = {"rank": module.rank, "kept_rank": int(basis.shape[1]), "shots": shots or 0}
    for key, role, _ in PROTOCOL_ROWS:
        if role not in evaluated:
            continue
        split, logits = evaluated[role]
        results[key], results[f"{key}_std"] = accuracy(logits, split)
        oracle = datamodule.oracle_logits(role, split)
        if oracle is not None:
            results[f"oracle/{key}"], results[f"oracle/{key}_std"] = accuracy(oracle, split)
    return results


def format_table(results: dict[str, float | int]) -> str:
    has_oracle = any(key.startswith("oracle/") for key in results)
    header = f"{'LoRe protocol (K=' + str(results['rank']) + ', kept ' + str(results['kept_rank']) + ')':<34}{'accuracy':>18}"
    header += f"{'oracle':>18}" if has_oracle else ""
    lines = [header, "-" * len(header)]
    for key, _, label in PROTOCOL_ROWS:
        if key not in results:
            continue
        row = f"{label:<34}{results[key]:>10.4f} ± {results[key + '_std']:.4f}"
        if f"oracle/{key}" in results:
            row += f"{results['oracle/' + key]:>10.4f} ± {results['oracle/' + key + '_std']:.4f}"
        lines.append(row)
    lines.append("(mean over users ± plain std over users)")
    return "\n".join(lines)


def _best_checkpoint_path(trainer: Trainer) -> str:
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.monitor is None or not checkpoint.best_model_path:
        raise ValueError("use_best_checkpoint needs a ModelCheckpoint that monitors a metric and saved a best model")
    return checkpoint.best_model_path


class ProtocolEvaluation(Callback):
    """At the end of ``fit`` of a ``BasisModule``: adapt the unseen users with few-shot, then log,
    print and save the four protocol accuracies (and the oracle's, where the data know it).

    Writes ``protocol.json`` and the learned basis ``basis.safetensors`` into the run directory,
    logs every number to the logger, and the unseen users' test accuracy as ``hp_metric``.

    Args:
        shots: pairs per unseen user to adapt on (``null``: the whole few-shot pool).
        shot_seed: seed of the shots subsample and the initial logits.
        steps: Adam steps of the few-shot fit (500 in the reference).
        lr: Adam learning rate of the few-shot fit (0.1 in the reference).
        weight_init: initial logits of the few-shot fit: ``randn`` (the reference), ``zeros`` or
            ``population`` (the seen users' mean weights).
        prior_strength: MAP pull towards the seen users' mean weights (0: the reference's plain fit).
        filename: name of the JSON file written into the run directory.
        export_basis: also write the pruned basis as ``basis.safetensors`` in the run directory.
        use_best_checkpoint: evaluate the best checkpoint of the trainer's ``ModelCheckpoint`` (one
            that monitors a metric, e.g. ``val/acc`` on held-out pairs) instead of the last weights.
    """

    def __init__(
        self,
        shots: int | None = 10,
        shot_seed: int = 0,
        steps: int = 500,
        lr: float = 0.1,
        weight_init: Literal["randn", "zeros", "population"] = "randn",
        prior_strength: float = 0.0,
        filename: str = "protocol.json",
        export_basis: bool = True,
        use_best_checkpoint: bool = False,
    ) -> None:
        if shots is not None and shots <= 0:
            raise LoreDataError(f"shots must be a positive number of pairs per user (or null for all), got {shots}")
        self.shots, self.shot_seed, self.steps, self.lr = shots, shot_seed, steps, lr
        self.weight_init, self.prior_strength = weight_init, prior_strength
        self.filename, self.export_basis, self.use_best_checkpoint = filename, export_basis, use_best_checkpoint
        self.results: dict[str, float | int] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Check before training, not after it: the few-shot half of the protocol needs unseen users.
        datamodule = trainer.datamodule
        if stage != "fit" or not isinstance(pl_module, BasisModule) or not isinstance(datamodule, PreferenceDataModule):
            return
        if not datamodule.has_split("unseen_pool") or len(datamodule.split("unseen_pool")) == 0:
            raise LoreDataError(
                f"ProtocolEvaluation adapts unseen users few-shot, but {type(datamodule).__name__} has no unseen users "
                "with few-shot pool pairs (unseen_pool is empty); give the data unseen users or drop the callback"
            )

    @staticmethod
    def _restore_best(trainer: Trainer, pl_module: BasisModule) -> None:
        path = _best_checkpoint_path(trainer)
        state = torch.load(path, map_location=pl_module.device, weights_only=False)["state_dict"]
        pl_module.load_state_dict(state)
        pl_module.prune_()  # the best step is usually not the last, where pruning happens
        pl_module.best_checkpoint_path = path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(pl_module, BasisModule) or not isinstance(datamodule, PreferenceDataModule):
            rank_zero_warn("ProtocolEvaluation needs a BasisModule and a PreferenceDataModule; skipped")
            return
        if trainer.interrupted:
            return  # a stopped run has no finished basis to report
        if datamodule.has_split("unseen_pool") and datamodule.num_unseen_users == 0:
            raise LoreDataError("few-shot evaluation was asked for, but the data module has no unseen users")
        if self.use_best_checkpoint:
            self._restore_best(trainer, pl_module)
        self.results = evaluate_protocol(
            pl_module, datamodule, self.shots, self.shot_seed, self.steps, self.lr, self.weight_init,
            self.prior_strength,
            # on_fit_end runs after the strategy moved the module back to the CPU: evaluate on the
            # training device instead
            device=trainer.strategy.root_device,
        )
        # log_dir broadcasts from rank 0: every rank must ask, or rank 0 waits forever under DDP
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        write_json_atomic(run_dir / self.filename, self.results)
        if self.export_basis:
            basis, weights = pl_module.kept_basis()
            exported = BasisFile(basis, float(pl_module.hparams.tau), pl_module.reference_head,
                                 datamodule.seen_user_ids, weights, datamodule.embedder)
            save_basis(run_dir / "basis.safetensors", exported)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.results.items() if "/" in k}, step=trainer.global_step)
            if "unseen/test_acc" in self.results:
                logger.log_hyperparams(pl_module.hparams, {"hp_metric": self.results["unseen/test_acc"]})
            logger.save()
        print("\n" + format_table(self.results) + f"\nwritten: {run_dir / self.filename}", flush=True)
