"""After the basis is trained: adapt the unseen users and report the protocol's four numbers,
beside one shared reward model (K=1), the population-average weights, "the longer response wins" and
the crowd's win-rate of each response on the same users and prompts, then the diagnosis of personal signal."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from datamodules.base import ROLES, PreferenceDataModule
from lore_pl.core import functional as LF
from lore_pl.core.baselines import crowd_coverage, crowd_logits, longer_wins_logits
from lore_pl.core.diagnosis import diagnose, format_diagnosis
from lore_pl.core.estimator import MapSettings, shared_direction
from lore_pl.core.fewshot import FewShotSettings
from lore_pl.core.model import LoreModel
from lore_pl.core.stats import mean_std_over_users, paired_bootstrap, per_user_accuracy
from lore_pl.data.atomic import write_json_atomic
from lore_pl.data.preferences import PreferenceSplit
from lore_pl.errors import LoreDataError
from lore_pl.modules.basis import BasisModule
from lore_pl.modules.fewshot import FewShotModule

#: (result key, data role, label in the printed table)
PROTOCOL_ROWS = (
    ("seen/train_acc", "seen_train", "seen users, train pairs"),
    ("seen/test_acc", "seen_test", "seen users, unseen prompts"),
    ("unseen/fewshot_acc", "unseen_pool", "unseen users, few-shot pairs"),
    ("unseen/test_acc", "unseen_test", "unseen users, unseen prompts"),
)
#: the rows every baseline is scored on, and the personalization gain is measured on
COMPARED = ("seen/test_acc", "unseen/test_acc")
BASELINES = {
    "shared": "one shared model (K=1)",
    "population": "population-average weights",
    "longer": "the longer response wins",
    "crowd": "the crowd's win-rate",
}
#: column headings of the printed table
COLUMNS = {"shared": "shared K=1", "population": "population w", "longer": "longer wins", "crowd": "crowd"}


def user_accuracies(logits: Tensor, split: PreferenceSplit, tie_credit: float = 0.0) -> Tensor:
    """Each user's accuracy ``[C]`` (NaN for a user without pairs; a zero logit counts ``tie_credit``)."""
    return per_user_accuracy(logits.detach().cpu(), split.users.cpu(), split.num_users, tie_credit)


def accuracy(logits: Tensor, split: PreferenceSplit) -> tuple[float, float]:
    """(mean over users, plain std over users) of per-user accuracy; users without pairs left out."""
    return mean_std_over_users(user_accuracies(logits, split))


def logits_of(split: PreferenceSplit, basis: Tensor, weights: Tensor, tau: float, device) -> Tensor:
    """Every pair's logit, computed block by block (``PreferenceSplit.row_blocks``): a split kept on disk
    is streamed, never read whole into memory."""
    weights = weights.to(device)
    return torch.cat([LF.pair_logits(block.to(device), split.users[rows].to(device), basis, weights, tau)
                      for rows, block in split.row_blocks()])


def shared_baseline(model: LoreModel, datamodule: PreferenceDataModule, settings: MapSettings = MapSettings()
                    ) -> tuple[Tensor, float]:
    """(``v`` ``[d, 1]`` on the logit scale, a note) of one shared Bradley-Terry direction fitted on the seen
    users' train pairs by the MAP ridge path, its ridge chosen on the validation pairs. A K=1 model is its
    own baseline."""
    if model.rank == 1 and not model.personalized:
        return model.basis.detach() / model.temperature, "the model itself (K=1)"
    train = datamodule.split("seen_train")
    if datamodule.has_split("seen_val") and len(datamodule.split("seen_val")):
        val = datamodule.split("seen_val")
    else:  # no validation pairs: one middle strength, chosen by nobody
        settings = MapSettings(shared_path=(1e3,))
        val = train
    v, ridge, _ = shared_direction(train.features, train.users, val.features, val.users, train.num_users, settings)
    return v, f"ridge {ridge:g}" + ("" if val is not train else " (fixed: no validation pairs)")


@torch.no_grad()
def evaluate_protocol(
    model: LoreModel,
    datamodule: PreferenceDataModule,
    fewshot: FewShotSettings = FewShotSettings(),
    device: torch.device | str | None = None,
    shared: Tensor | None = None,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """The four protocol accuracies (each with its std over users), the oracle's where known, and the
    baselines on the same users and prompts, with the gain over each (and over the best of them) and its
    95% paired-bootstrap interval over users; then the diagnosis of personal signal (``results["diagnosis"]``).

    The seen users are scored with their own weights; the unseen users are adapted to the pruned
    basis by ``FewShotModule`` with ``fewshot`` (``shots`` pairs each, drawn with ``shot_seed``; a prior
    chosen on their validation pairs where asked), and their few-shot accuracy is measured on those
    pairs. Baselines: ``shared`` (``v`` ``[d, 1]``, a K=1 direction on the logit scale, when given) and
    ``population`` (every user at the seen users' mean weights, on this basis), and the rules that read
    no features: ``longer`` (the longer response wins; needs ``PreferenceSplit.lengths``) and ``crowd`` (each
    response's win-rate in the seen users' train pairs and the unseen users' few-shot pairs; needs
    ``PreferenceSplit.responses``). A baseline the data cannot give is None, as are its gains.
    """
    device = torch.device(device) if device is not None else model.basis.device
    basis, seen_weights = (tensor.to(device) for tensor in model.kept())
    tau = model.temperature
    evaluated: dict[str, tuple[PreferenceSplit, Tensor]] = {}
    for role in ("seen_train", "seen_test"):
        if datamodule.has_split(role):
            split = datamodule.split(role)
            evaluated[role] = (split, logits_of(split, basis, seen_weights, tau, device))
    results: dict[str, float | int | str] = {
        "held_out": datamodule.held_out,  # what the test pairs hold out: prompts, responses or own prompts
        "rank": model.rank,
        "kept_rank": int(basis.shape[1]),
        "shots": fewshot.shots or 0,
    }
    unseen_weights = None
    if datamodule.has_split("unseen_pool"):
        pool = datamodule.split("unseen_pool")
        val = datamodule.split("unseen_val") if datamodule.has_split("unseen_val") else None
        adapter = FewShotModule.from_model(model, fewshot).to(device)
        unseen_weights = adapter.adapt(pool, val)
        if adapter.prior_choice:
            results["fewshot_prior"] = adapter.prior_choice
        shots = adapter.shots_of(pool)
        evaluated["unseen_pool"] = (shots, logits_of(shots, basis, unseen_weights, tau, device))
        if datamodule.has_split("unseen_test"):
            test = datamodule.split("unseen_test")
            evaluated["unseen_test"] = (test, logits_of(test, basis, unseen_weights, tau, device))
    for key, role, _ in PROTOCOL_ROWS:
        if role not in evaluated:
            continue
        split, logits = evaluated[role]
        results[key], results[f"{key}_std"] = accuracy(logits, split)
        oracle = datamodule.oracle_logits(role, split)
        if oracle is not None:
            results[f"oracle/{key}"], results[f"oracle/{key}_std"] = accuracy(oracle, split)

    heads = {"population": (basis, seen_weights.mean(0, keepdim=True), tau)}
    if shared is not None:
        heads["shared"] = (shared.to(device), torch.ones(1, 1, device=device), 1.0)
    training = training_pairs(evaluated)
    role_of = {key: role for key, role, _ in PROTOCOL_ROWS}
    for key in COMPARED:
        if role_of[key] not in evaluated:
            continue
        split, logits = evaluated[role_of[key]]
        mine = user_accuracies(logits, split)
        compared: dict[str, Tensor | None] = {}
        for name, (head_basis, weights, head_tau) in heads.items():
            baseline = logits_of(split, head_basis, weights.expand(split.num_users, -1), head_tau, device)
            compared[name] = user_accuracies(baseline, split)  # once: the table's numbers and the bootstrap's
        compared["longer"] = longer_wins(split)
        compared["crowd"], results[f"baselines/crowd/{key}_coverage"] = crowd(training, split)
        for name, theirs in compared.items():
            record_gain(results, name, key, mine, theirs, seed)
        record_best(results, key, [name for name, theirs in compared.items() if theirs is not None])
    results["diagnosis"] = diagnosis_of(datamodule, evaluated, training, results, seed)
    return results


def longer_wins(split: PreferenceSplit) -> Tensor | None:
    """Per-user accuracy of "the longer response wins" (ties count half); None where lengths are unknown."""
    if split.lengths is None:
        return None
    return user_accuracies(longer_wins_logits(split.lengths), split, tie_credit=0.5)


def training_pairs(evaluated: dict[str, tuple[PreferenceSplit, Tensor]]) -> dict[str, PreferenceSplit]:
    """What the protocol trains on, by role: the seen users' train pairs and the unseen users' few-shot pairs."""
    return {role: evaluated[role][0] for role in ("seen_train", "unseen_pool") if role in evaluated}


def crowd(training: dict[str, PreferenceSplit], split: PreferenceSplit) -> tuple[Tensor | None, float | None]:
    """(per-user accuracy of the crowd's win-rates, share of ``split``'s pairs it covers).

    The win-rates are counted on the training pairs only. Not available (None, None) where a split does
    not know its responses; (None, 0.0) where no test pair has a response judged in training: then every
    prediction would be a coin flip, and the column says n/a rather than 0.5.
    """
    if not training or split.responses is None or any(part.responses is None for part in training.values()):
        return None, None
    train_responses = torch.cat([part.responses for part in training.values()])
    coverage = crowd_coverage(train_responses, split.responses)
    if not coverage:
        return None, coverage
    return user_accuracies(crowd_logits(train_responses, split.responses), split, tie_credit=0.5), coverage


def record_gain(results: dict, name: str, key: str, mine: Tensor, theirs: Tensor | None, seed: int) -> None:
    """The baseline's mean ± std and the model's gain over it with its interval (None where not available)."""
    stats = ("", "_std")
    gains = ("", "_low", "_high")
    if theirs is None:
        results.update({f"baselines/{name}/{key}{end}": None for end in stats})
        results.update({f"gain/{name}/{key}{end}": None for end in gains})
        return
    results[f"baselines/{name}/{key}"], results[f"baselines/{name}/{key}_std"] = mean_std_over_users(theirs)
    gain = paired_bootstrap(mine, theirs, seed=seed)
    results[f"gain/{name}/{key}"] = gain["gain"]
    results[f"gain/{name}/{key}_low"], results[f"gain/{name}/{key}_high"] = gain["low"], gain["high"]


def record_best(results: dict, key: str, names: list[str]) -> None:
    """The gain over the baseline with the highest mean accuracy on these pairs (chosen on them: the
    strictest comparison for the model)."""
    def score(name: str) -> float:
        value = results[f"baselines/{name}/{key}"]
        return float("-inf") if value != value else value  # NaN: a baseline without users

    if not names:
        return
    best = max(names, key=score)
    results[f"gain/best/{key}_name"] = best
    for end in ("", "_low", "_high"):
        results[f"gain/best/{key}{end}"] = results[f"gain/{best}/{key}{end}"]


def stacked(parts: list[tuple[PreferenceSplit, int]]) -> tuple[Tensor, Tensor]:
    """(responses ``[N, 2]``, users ``[N]``) of the splits that know their responses, each split's users
    shifted by its offset (seen and unseen users in one table)."""
    known = [(split, offset) for split, offset in parts if split.responses is not None]
    if not known:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return (torch.cat([split.responses for split, _ in known]),
            torch.cat([split.users.cpu() + offset for split, offset in known]))


def diagnosis_of(datamodule: PreferenceDataModule, evaluated: dict[str, tuple[PreferenceSplit, Tensor]],
                 training: dict[str, PreferenceSplit], results: dict, seed: int) -> dict:
    """The diagnosis of personal signal (``lore_pl.core.diagnosis``) on this run's splits: (a) on every
    judgment, (b) trained on the protocol's training pairs and measured on the test pairs, (c) the gain
    over K=1 on unseen users' unseen prompts. Seen and unseen users share one table (unseen rows after)."""
    offset = {"seen": 0, "unseen": datamodule.num_users}

    def shift(split: PreferenceSplit, role: str) -> tuple[PreferenceSplit, int]:
        return split, offset[role.split("_")[0]]

    roles = [role for role in ROLES if datamodule.has_split(role)]
    judged = stacked([shift(datamodule.split(role), role) for role in roles])
    train = stacked([shift(split, role) for role, split in training.items()])
    test = stacked([shift(evaluated[role][0], role) for role in ("seen_test", "unseen_test") if role in evaluated])
    key = "gain/shared/unseen/test_acc"
    personalization = None
    if results.get(key) is not None:
        personalization = {"gain": results[key], "low": results[f"{key}_low"], "high": results[f"{key}_high"]}
    return diagnose(*judged, *train, *test, datamodule.num_users + datamodule.num_unseen_users,
                    personalization=personalization, seed=seed)


def format_table(results: dict) -> str:
    """The printed report: the protocol's rows against every baseline (n/a where the data cannot give
    one), the crowd's coverage, the gains over each baseline and over the best of them."""
    has_oracle = any(key.startswith("oracle/") for key in results)
    names = [name for name in BASELINES if any(key.startswith(f"baselines/{name}/") for key in results)]
    columns = ["this model"] + [COLUMNS[name] for name in names] + (["oracle"] if has_oracle else [])
    header = f"{'LoRe protocol (K=' + str(results['rank']) + ', kept ' + str(results['kept_rank']) + ')':<34}"
    header += "".join(f"{column:>18}" for column in columns)
    lines = [header, "-" * len(header)]

    def cell(key: str) -> str:
        if key not in results:
            return f"{'':>18}"
        if results[key] is None:
            return f"{'n/a':>18}"
        return f"{results[key]:>10.4f} ± {results[key + '_std']:.4f}"

    for key, _, label in PROTOCOL_ROWS:
        if key not in results:
            continue
        label = row_label(label, results)
        row = f"{label:<34}{cell(key)}" + "".join(cell(f"baselines/{name}/{key}") for name in names)
        row += cell(f"oracle/{key}") if has_oracle else ""
        lines.append(row)
    lines.append("(mean over users ± plain std over users)")
    lines += notes_on_rules(results)
    for key, label in (
        ("unseen/test_acc", "unseen users, unseen prompts"),
        ("seen/test_acc", "seen users, unseen prompts"),
    ):
        label = row_label(label, results)
        gains = [f"{gain_text(results, name, key)} over {BASELINES[name]}" for name in names
                 if results.get(f"gain/{name}/{key}") is not None]
        if gains:
            lines.append(f"gain on {label}: " + "; ".join(gains))
        best = results.get(f"gain/best/{key}_name")
        if best is not None:
            lines.append(f"  over the best baseline there ({BASELINES[best]}): {gain_text(results, 'best', key)}")
    if names:
        lines.append("(mean over users of the per-user difference, [95% paired bootstrap interval over users])")
    return "\n".join(lines)


def row_label(label: str, results: dict) -> str:
    """A row's label with what its test pairs hold out (``unseen responses`` under a response split)."""
    return label.replace("unseen prompts", f"unseen {results.get('held_out', 'prompts')}")


def gain_text(results: dict, name: str, key: str) -> str:
    return (f"{results[f'gain/{name}/{key}']:+.4f} [{results[f'gain/{name}/{key}_low']:+.4f}, "
            f"{results[f'gain/{name}/{key}_high']:+.4f}]")


def notes_on_rules(results: dict) -> list[str]:
    """Why a rule baseline is n/a, and how much of the test pairs the crowd covers."""
    notes = []
    keys = [key for key in COMPARED if key in results]
    if keys and all(results.get(f"baselines/longer/{key}") is None for key in keys):
        notes.append("longer wins: n/a (the data do not give the responses' lengths)")
    coverage = {key: results.get(f"baselines/crowd/{key}_coverage") for key in keys}
    if keys and all(value is None for value in coverage.values()):
        notes.append("crowd: n/a (the data do not give response ids)")
    elif keys and not any(coverage.values()):
        notes.append("crowd: n/a (no test pair has a response judged in training: responses do not recur across "
                     "this split)")
    elif keys:
        labels = {"seen/test_acc": "seen users'", "unseen/test_acc": "unseen users'"}
        shares = ", ".join(f"{value:.1%} of {labels[key]} test pairs" for key, value in coverage.items()
                           if value is not None)
        notes.append(f"crowd: win-rates from training pairs only; a response judged there in {shares}"
                     + (" (n/a where none: responses do not recur)" if not all(coverage.values()) else "")
                     + "; the rest are coin flips")
    return notes


def loggable(results: dict) -> dict[str, float]:
    """The numbers of ``results`` a logger takes: every ``a/b`` number, and the diagnosis's as ``diagnosis/...``."""
    numbers = {k: v for k, v in results.items() if "/" in k and isinstance(v, (int, float))}
    for part, values in results.get("diagnosis", {}).items():
        if isinstance(values, dict):
            numbers.update({f"diagnosis/{part}/{name}": value for name, value in values.items()
                            if isinstance(value, (int, float))})
    return numbers


class ProtocolEvaluation(Callback):
    """At the end of ``fit`` of a ``BasisModule``: adapt the unseen users with few-shot, then log,
    print and save the four protocol accuracies (and the oracle's, where the data know it), beside
    one shared model (K=1, the same seen users' pairs, its ridge chosen on the validation pairs),
    the population-average weights, "the longer response wins" and the crowd's win-rate (where the data
    give lengths and response ids), with the gain over each and its 95% interval, then the diagnosis of
    personal signal (docs/guide.md, "The skeptic's baselines and the diagnosis of personal signal").

    The unseen users are adapted as the module says (``BasisModule.fewshot``). Writes
    ``protocol.json`` into the run directory, logs every number to the logger, and the unseen
    users' test accuracy as ``hp_metric``. After a ``RestoreBestCheckpoint`` it evaluates the best
    checkpoint's model.

    Args:
        filename: name of the JSON file written into the run directory.
        baselines: also fit and report the shared K=1 model (the population-average one costs nothing).
    """

    reads_final_model = True  # RestoreBestCheckpoint must run before this

    def __init__(self, filename: str = "protocol.json", baselines: bool = True) -> None:
        self.filename, self.baselines = filename, baselines
        self.results: dict | None = None

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
        device = trainer.strategy.root_device
        shared, note = (
            shared_baseline(pl_module.model, datamodule, pl_module.map_settings) if self.baselines else (None, "")
        )
        self.results = evaluate_protocol(pl_module.model, datamodule, pl_module.fewshot, device=device, shared=shared)
        if note:
            self.results["baselines/shared/fit"] = note
        if pl_module.selection:
            self.results["selection"] = pl_module.selection
        # log_dir broadcasts from rank 0: every rank must ask, or rank 0 waits forever under DDP
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        write_json_atomic(run_dir / self.filename, self.results)
        for logger in trainer.loggers:
            logger.log_metrics(loggable(self.results), step=trainer.global_step)
            if "unseen/test_acc" in self.results:
                sizes = {
                    "num_users": pl_module.model.num_users,
                    "feature_dim": pl_module.model.dim,
                    "chosen_rank": pl_module.model.rank,
                }
                logger.log_hyperparams({**pl_module.hparams, **sizes}, {"hp_metric": self.results["unseen/test_acc"]})
            logger.save()
        report = format_table(self.results) + "\n" + format_diagnosis(self.results["diagnosis"])
        print("\n" + report + f"\nwritten: {run_dir / self.filename}", flush=True)
