"""After the basis is trained: adapt the unseen users and report the protocol's four numbers."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from datamodules.base import PreferenceDataModule
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings
from lore_pl.core.model import LoreModel
from lore_pl.data.atomic import write_json_atomic
from lore_pl.data.preferences import PreferenceSplit
from lore_pl.errors import LoreDataError
from lore_pl.modules.basis import BasisModule
from lore_pl.modules.fewshot import FewShotModule
from lore_pl.modules.metrics import PerUserAccuracy

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
    model: LoreModel,
    datamodule: PreferenceDataModule,
    fewshot: FewShotSettings = FewShotSettings(),
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """The four protocol accuracies (each with its std over users), and the oracle's where known.

    The seen users are scored with their own weights; the unseen users are adapted to the pruned
    basis by ``FewShotModule`` with ``fewshot`` (``shots`` pairs each, drawn with ``shot_seed``), and
    their few-shot accuracy is measured on those pairs.
    """
    device = torch.device(device) if device is not None else model.basis.device
    basis, seen_weights = (tensor.to(device) for tensor in model.kept())
    tau = model.temperature
    evaluated: dict[str, tuple[PreferenceSplit, Tensor]] = {}
    for role in ("seen_train", "seen_test"):
        if datamodule.has_split(role):
            split = datamodule.split(role)
            logits = LF.pair_logits(split.features.to(device), split.users.to(device), basis, seen_weights, tau)
            evaluated[role] = (split, logits)
    if datamodule.has_split("unseen_pool"):
        pool = datamodule.split("unseen_pool")
        adapter = FewShotModule.from_basis(basis, tau, seen_weights, fewshot=fewshot).to(device)
        unseen_weights = adapter.adapt(pool)
        shots = adapter.shots_of(pool)
        evaluated["unseen_pool"] = (shots, LF.pair_logits(shots.features.to(device), shots.users.to(device), basis,
                                                          unseen_weights, tau))
        if datamodule.has_split("unseen_test"):
            test = datamodule.split("unseen_test")
            logits = LF.pair_logits(test.features.to(device), test.users.to(device), basis, unseen_weights, tau)
            evaluated["unseen_test"] = (test, logits)

    results: dict[str, float | int] = {"rank": model.rank, "kept_rank": int(basis.shape[1]),
                                       "shots": fewshot.shots or 0}
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


class ProtocolEvaluation(Callback):
    """At the end of ``fit`` of a ``BasisModule``: adapt the unseen users with few-shot, then log,
    print and save the four protocol accuracies (and the oracle's, where the data know it).

    The unseen users are adapted as the module says (``BasisModule.fewshot``). Writes
    ``protocol.json`` into the run directory, logs every number to the logger, and the unseen
    users' test accuracy as ``hp_metric``. After a ``RestoreBestCheckpoint`` it evaluates the best
    checkpoint's model.

    Args:
        filename: name of the JSON file written into the run directory.
    """

    reads_final_model = True  # RestoreBestCheckpoint must run before this

    def __init__(self, filename: str = "protocol.json") -> None:
        self.filename = filename
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

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(pl_module, BasisModule) or not isinstance(datamodule, PreferenceDataModule):
            return  # phase 2 or another job: there is no basis to report on
        if trainer.interrupted:
            return  # a stopped run has no finished basis to report
        # on_fit_end runs after the strategy moved the module back to the CPU: evaluate on the
        # training device instead
        self.results = evaluate_protocol(pl_module.model, datamodule, pl_module.fewshot, device=trainer.strategy.root_device)
        # log_dir broadcasts from rank 0: every rank must ask, or rank 0 waits forever under DDP
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        write_json_atomic(run_dir / self.filename, self.results)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.results.items() if "/" in k}, step=trainer.global_step)
            if "unseen/test_acc" in self.results:
                sizes = {"num_users": pl_module.model.num_users, "feature_dim": pl_module.model.dim}
                logger.log_hyperparams({**pl_module.hparams, **sizes}, {"hp_metric": self.results["unseen/test_acc"]})
            logger.save()
        print("\n" + format_table(self.results) + f"\nwritten: {run_dir / self.filename}", flush=True)
