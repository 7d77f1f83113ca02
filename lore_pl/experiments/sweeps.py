"""The protocol's sweeps as commands: ``lore-pl-sweep shots|rank --config configs/sweep/*.yaml``.

The shots sweep fits every (shots, trial, unseen user) as one batched problem: each fit is a
"virtual user" of one run of the few-shot solver, which gives exactly each fit's own answer because
the few-shot objective is a sum of independent per-user terms. Each command writes ``results.json``,
``results.csv`` and ``results.png`` into its output folder and the same figure to TensorBoard there.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from datamodules.base import PreferenceDataModule
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import (
    FewShotSettings,
    adapt_users,
    choose_prior,
    fit_stacked,
    per_fit_accuracy,
    stack_shots,
    weights_logit_variance,
)
from lore_pl.core.selection import SELECTIONS, active_fits, posterior_precision
from lore_pl.data.atomic import write_atomic
from lore_pl.data.basis_file import check_embedder, load_basis
from lore_pl.data.outputs import OutputKind, claim_outputs, first_line_starts, json_field_is, png_text_is
from lore_pl.data.preferences import PreferenceSplit
from lore_pl.errors import LoreDataError

#: Few-shot methods compared by the shots sweep: (weight init, prior strength). ``None``: the prior
#: chosen on the unseen users' validation pairs (``choose_prior``), or the basis's own prior.
METHODS = {
    "reference": ("randn", 0.0),  # the reference: random start, no prior
    "population": ("population", 0.0),  # start at the population's mean logits
    "map": ("population", None),  # that start plus a Gaussian prior around it (MAP), chosen on held-out prompts
    "average": ("average", 0.0),  # no fit: every user at the seen users' mean weights (the baseline to beat)
}


def held_out_prior(basis: Tensor, tau: float, pool: PreferenceSplit, val: PreferenceSplit, prior_logits: Tensor,
                   variance: Tensor | None, shots: int, settings: FewShotSettings) -> tuple[Tensor, str]:
    """The few-shot prior chosen on the unseen users' validation pairs (prompts disjoint from their pool),
    fitting ``shots`` of each user's pool pairs: (precision ``[K]``, its label)."""
    drawn = pool.draw_shots(shots, settings.shot_seed)
    precision, label, _ = choose_prior(LF.project(drawn.features, basis), drawn.users,
                                       LF.project(val.features, basis), val.users, pool.num_users, settings, tau,
                                       prior_logits, variance)
    return precision, label


def shots_sweep(basis: Tensor, tau: float, pool: PreferenceSplit, test: PreferenceSplit, shots: list[int],
                trials: int, settings: FewShotSettings = FewShotSettings(), prior_logits: Tensor | None = None,
                prior_precision: Tensor | None = None) -> Tensor:
    """Unseen users' test accuracy (mean over users) for each (shots, trial): ``[len(shots), trials]``.

    Every (shots, trial) draws a fresh subsample (``settings.shot_seed``); the fits are ``settings``'s
    (with ``prior_precision`` where its ``prior_strength`` is null).
    """
    stacked = stack_shots(LF.project(pool.features, basis), pool.users, pool.num_users, shots, trials,
                          settings.shot_generator())
    weights = fit_stacked(stacked, settings, tau, prior_logits, prior_precision)
    return per_fit_accuracy(LF.project(test.features, basis), test.users, weights, tau).reshape(len(shots), trials)


def active_sweep(basis: Tensor, tau: float, pool: PreferenceSplit, test: PreferenceSplit, shots: list[int],
                 selection: str, settings: FewShotSettings, prior_logits: Tensor | None = None,
                 prior_precision: Tensor | None = None, covariance_precision: Tensor | None = None) -> Tensor:
    """Unseen users' test accuracy (mean over users) after each of ``shots`` pairs asked by ``selection``
    from their pool, one at a time (``active_fits``): ``[len(shots)]``. Deterministic: one run, no trials."""
    weights, _ = active_fits(LF.project(pool.features, basis), pool.users, pool.num_users, shots, selection,
                             settings, tau, prior_logits, prior_precision, covariance_precision,
                             settings.shot_generator())
    return per_fit_accuracy(LF.project(test.features, basis), test.users, weights, tau)


def shots_to_match(active: list[float], random: list[float], shots: list[int]) -> dict[str, int | None]:
    """For each shots value s of the random curve, the fewest shots at which ``active`` reaches random's
    accuracy at s (None: not within the shots swept)."""
    order = sorted(range(len(shots)), key=lambda i: shots[i])
    return {str(shots[i]): next((shots[j] for j in order if active[j] >= random[i] - 1e-12), None) for i in order}


PROTOCOL_KEYS = ("seen/train_acc", "seen/test_acc", "unseen/fewshot_acc", "unseen/test_acc")


#: the files each sweep writes into its output folder
RESULT_FILES = ("results.json", "results.csv", "results.png")


def sweep_output(command: str) -> OutputKind:
    """What ``lore-pl-sweep COMMAND`` writes, known by its marks: ``"command"`` in results.json, the
    CSV's first column (``shots``/``rank``) and a ``lore-pl`` text entry in the PNG."""
    name = f"lore-pl-sweep {command}"
    marks = {".json": json_field_is("command", name), ".csv": first_line_starts(f"{command},"),
             ".png": png_text_is("lore-pl", name)}
    return OutputKind(name, lambda path: path.suffix in marks and marks[path.suffix](path),
                      f"the results.json/csv/png of a {command} sweep")


def claim_results(out: Path, command: str, inputs: list, overwrite: bool):
    """The sweep's results files, checked and locked for the whole sweep (``claim_outputs``): a sweep
    refused there stops before it computes anything."""
    return claim_outputs([out / name for name in RESULT_FILES], sweep_output(command), inputs, overwrite)


def _write_outputs(out: Path, payload: dict, header: list[str], rows: list[list], figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    # atomic (temporary file, then rename): a killed sweep leaves the previous results whole
    write_atomic(out / "results.json", lambda stream: json.dump(payload, stream, indent=2))
    def write_csv(stream) -> None:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)

    write_atomic(out / "results.csv", write_csv)
    write_atomic(out / "results.png", lambda stream: figure.savefig(
        stream, format="png", dpi=120, bbox_inches="tight", metadata={"lore-pl": payload["command"]}), binary=True)
    tensorboard = SummaryWriter(str(out))
    tensorboard.add_figure(f"sweeps/{out.name}", figure)
    tensorboard.close()


def _time_loop(projected: Tensor, users: Tensor, num_users: int, shots: int, settings: FewShotSettings, tau: float,
               prior: Tensor | None, sample: int) -> float:
    """Seconds per fit of a per-user Python loop doing the same fits (timed on ``sample`` fits)."""
    stacked = stack_shots(projected, users, num_users, [shots], 1, settings.shot_generator())
    chosen = torch.randperm(num_users, generator=settings.init_generator())[:sample]
    start = time.perf_counter()
    for user in chosen.tolist():
        rows = stacked.users == user
        adapt_users(stacked.projected[rows], torch.zeros(int(rows.sum()), dtype=torch.long), 1, settings, tau, prior)
    return (time.perf_counter() - start) / len(chosen)


def shots(
    basis_path: str,
    data: PreferenceDataModule,
    shots: list[int] = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50],  # noqa: B006 - read by jsonargparse
    trials: int = 20,
    methods: list[str] = ["reference"],  # noqa: B006
    selection: list[str] = ["random"],  # noqa: B006
    fewshot: FewShotSettings = FewShotSettings(),
    prior_shots: int = 10,
    loop_sample: int = 0,
    out_dir: str = "lightning_logs/sweeps/shots",
    overwrite: bool = False,
) -> dict:
    """Unseen users' test accuracy against the number of shots, mean and std over trials.

    Args:
        basis_path: a trained basis: ``basis.safetensors`` of a run, or a BasisModule ``.ckpt``.
        data: the data module whose unseen users are adapted (``unseen_pool``, ``unseen_test``).
        shots: pairs per user to adapt on.
        trials: independent subsamples per shots value.
        methods: few-shot methods to compare: ``reference`` (random start), ``population`` (start at
            the population's mean logits), ``map`` (that start and a prior, chosen on the unseen users'
            validation pairs, or the basis's own prior where there are none), ``average`` (no fit: the
            seen users' mean weights for everyone).
        selection: how the pairs are chosen from each user's pool: ``random`` (a fresh subsample per
            trial, always run: the baseline), ``uncertainty`` and ``information`` (asked one at a time,
            refitting after each answer; see ``lore_pl.core.selection``), for every fitted method, on the
            same users, pools and test prompts. An active curve is one deterministic run (std 0).
        fewshot: the few-shot fit (Adam steps and lr; ``shot_seed`` seeds the subsamples and the
            starts; ``shots``, ``weight_init`` and ``prior_strength`` are set per shots value and method).
        prior_shots: shots at which ``map`` chooses its prior (the prior's pull then fades with more shots).
        loop_sample: also time a per-user Python loop on this many fits, to compare (0: skip).
        out_dir: where results.json, results.csv, results.png and the TensorBoard figure go.
        overwrite: replace results files there that this sweep did not write (never its basis or data).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise LoreDataError(f"unknown few-shot methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    unknown = set(selection) - set(SELECTIONS)
    if unknown:
        raise LoreDataError(f"unknown selections {sorted(unknown)}; choose from {list(SELECTIONS)}")
    inputs = [basis_path, getattr(data, "path", None)]
    with claim_results(Path(out_dir), "shots", inputs, overwrite):
        active = [name for name in dict.fromkeys(selection) if name != "random"]
        loaded = load_basis(basis_path)
        basis, tau = loaded.basis.float(), loaded.tau
        check_embedder(loaded.embedder, data.embedder, basis_path)
        pool, test = data.split("unseen_pool"), data.split("unseen_test")
        model = loaded.to_model()
        prior = model.population_logits()
        payload: dict = {"command": "lore-pl-sweep shots", "basis_path": str(basis_path), "rank": basis.shape[1],
                         "shots": shots, "trials": trials, "users": pool.num_users, "selection": ["random", *active],
                         "methods": {}}
        for method in methods:
            init, strength = METHODS[method]
            if init in ("population", "average") and prior is None and basis.shape[1] >= 2:
                raise LoreDataError(f"method {method!r} needs the seen users' weights, and {basis_path} has none")
            if init == "average":
                start = time.perf_counter()
                seen = loaded.user_weights if loaded.user_weights is not None else torch.ones(1, basis.shape[1])
                # one set of weights for every (shots, trial): scored once, repeated in the table
                weights = seen.float().mean(0).expand(1, pool.num_users, -1)
                accuracy = per_fit_accuracy(LF.project(test.features, basis), test.users, weights, tau)
                accuracy = accuracy.reshape(1, 1).expand(len(shots), trials)
                payload["methods"][method] = {"init": init, "prior": "none", "mean": accuracy.mean(1).tolist(),
                                              "std": accuracy.std(1, unbiased=False).tolist(),
                                              "seconds": time.perf_counter() - start}
                continue
            settings = replace(fewshot, weight_init=init, prior_strength=strength)
            precision, label = model.prior_precision, f"{strength:g}" if strength is not None else "the basis's"
            if strength is None and data.has_split("unseen_val") and basis.shape[1] >= 2:
                variance = None if loaded.user_weights is None else weights_logit_variance(loaded.user_weights, prior)
                precision, label = held_out_prior(
                    basis, tau, pool, data.split("unseen_val"), prior, variance, prior_shots, settings
                )
            start = time.perf_counter()
            accuracy = shots_sweep(basis, tau, pool, test, shots, trials, settings, prior, precision)
            seconds = time.perf_counter() - start
            result = {
                "init": init,
                "prior": label,
                "mean": accuracy.mean(1).tolist(),
                "std": accuracy.std(1, unbiased=False).tolist(),
                "seconds": seconds,
            }
            if loop_sample > 0:
                per_fit = _time_loop(
                    LF.project(pool.features, basis),
                    pool.users,
                    pool.num_users,
                    shots[len(shots) // 2],
                    settings,
                    tau,
                    prior,
                    loop_sample,
                )
                fits = len(shots) * trials * pool.num_users
                result.update(
                    loop_seconds_per_fit=per_fit,
                    loop_fits_timed=loop_sample,
                    loop_seconds_estimated=per_fit * fits,
                    speedup=per_fit * fits / seconds,
                )
            if active:
                fit_precision = strength if strength is not None else precision
                covariance_precision = posterior_precision(fit_precision, model.prior_precision, basis.shape[1],
                                                           loaded.user_weights, prior)
                result["selection"] = {}
                for name in active:
                    start = time.perf_counter()
                    curve = active_sweep(basis, tau, pool, test, shots, name, settings, prior, precision,
                                         covariance_precision).tolist()
                    result["selection"][name] = {"mean": curve, "std": [0.0] * len(curve),
                                                 "seconds": time.perf_counter() - start,
                                                 "shots_to_match_random": shots_to_match(curve, result["mean"], shots)}
            payload["methods"][method] = result

        series = shot_series(payload)
        header = ["shots"] + [f"{name}_{stat}" for name, _ in series for stat in ("mean", "std")]
        rows = [[s] + [result[stat][i] for _, result in series for stat in ("mean", "std")]
                for i, s in enumerate(shots)]
        figure, axis = plt.subplots(figsize=(6, 4))
        for name, result in series:
            axis.errorbar(shots, result["mean"], yerr=result["std"], marker="o", capsize=3, label=name,
                          linestyle="-" if name in payload["methods"] else "--")
        axis.set(
            xlabel="shots per unseen user",
            ylabel="unseen users' test accuracy",
            title=f"K={basis.shape[1]}, {trials} trials, mean ± std over trials",
        )
        axis.legend()
        _write_outputs(Path(out_dir), payload, header, rows, figure)
        plt.close(figure)
    print(format_shots_table(payload))
    return payload


def shot_series(payload: dict) -> list[tuple[str, dict]]:
    """Every curve of a shots sweep: each method with random shots (named by the method), then each
    method with each active selection (``METHOD_SELECTION``)."""
    series = [(m, r) for m, r in payload["methods"].items()]
    series += [(f"{m}_{name}", curve) for m, r in payload["methods"].items()
               for name, curve in r.get("selection", {}).items()]
    return series


def format_shots_table(payload: dict) -> str:
    methods = list(payload["methods"])
    series = shot_series(payload)
    lines = [f"{'shots':>5}" + "".join(f"{name:>24}" for name, _ in series)]
    for i, s in enumerate(payload["shots"]):
        cells = "".join(f"{r['mean'][i]:>15.4f} ± {r['std'][i]:.4f}" for _, r in series)
        lines.append(f"{s:>5}{cells}")
    for m in methods:
        r = payload["methods"][m]
        extra = f", prior {r['prior']}" if r["prior"] != "0" else ""
        if "speedup" in r:
            extra += (
                f"; a per-user loop would take {r['loop_seconds_estimated']:.1f} s "
                f"(timed on {r['loop_fits_timed']} fits): {r['speedup']:.0f}x slower"
            )
        lines.append(f"{m}: batched sweep {r['seconds']:.2f} s{extra}")
        for name, curve in r.get("selection", {}).items():
            matched = ", ".join(f"{s} -> {'>' + str(max(payload['shots'])) if n is None else n}"
                                for s, n in curve["shots_to_match_random"].items())
            lines.append(f"{m}_{name}: {curve['seconds']:.2f} s; shots to reach random's accuracy at "
                         f"(random shots -> {name} shots): {matched}")
    return "\n".join(lines)


def rank(
    experiment: str = "configs/experiment/synthetic.yaml",
    ranks: list[int] = [0, 1, 2, 3, 5, 8],  # noqa: B006 - read by jsonargparse
    overrides: list[str] = [],  # noqa: B006
    out_dir: str = "lightning_logs/sweeps/rank",
    overwrite: bool = False,
) -> dict:
    """The four protocol numbers against the rank K (0 is the reference head, shown as "ref").

    Runs ``lightning fit --config EXPERIMENT --model.init_args.rank=K`` for each K (the experiment
    must include the ``ProtocolEvaluation`` callback) and collects its results. ``--config`` takes
    a sweep config (``configs/sweep/rank.yaml``) or an experiment config (then it is the experiment).

    Args:
        experiment: the fit config to run for every rank.
        ranks: the ranks to run; 0 is the reference model (needs a data set with a reference head).
        overrides: extra ``lightning fit`` arguments for every run, e.g. ``--trainer.max_epochs=500``.
        out_dir: where results.json, results.csv, results.png, the runs and the TensorBoard figure go.
        overwrite: replace results files there that this sweep did not write (never its experiment config).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.protocol import ProtocolEvaluation
    from lore_pl.cli import build_cli

    with claim_results(Path(out_dir), "rank", [experiment], overwrite):
        results = {}
        for k in ranks:
            cli = build_cli(
                [
                    "fit",
                    "--config",
                    experiment,
                    f"--model.init_args.rank={k}",
                    f"--trainer.logger.init_args.save_dir={out_dir}",
                    f"--trainer.logger.init_args.name=rank_{k}",
                    *overrides,
                ]
            )
            found = [c.results for c in cli.trainer.callbacks if isinstance(c, ProtocolEvaluation)]
            if not found or found[0] is None:
                raise LoreDataError(f"{experiment} has no ProtocolEvaluation callback, or it produced no results")
            results[k] = found[0]
        labels = ["ref" if k == 0 else str(k) for k in ranks]
        payload = {
            "command": "lore-pl-sweep rank",
            "experiment": experiment,
            "ranks": ranks,
            "labels": labels,
            "results": {str(k): r for k, r in results.items()},
        }
        header = ["rank"] + [f"{key}{suffix}" for key in PROTOCOL_KEYS for suffix in ("", "_std")]
        rows = [
            [label] + [results[k].get(f"{key}{suffix}") for key in PROTOCOL_KEYS for suffix in ("", "_std")]
            for k, label in zip(ranks, labels)
        ]
        figure, axis = plt.subplots(figsize=(6, 4))
        for key in PROTOCOL_KEYS:
            axis.plot(labels, [results[k].get(key, float("nan")) for k in ranks], marker="o", label=key)
        axis.set(xlabel="rank K", ylabel="accuracy (mean over users)", title="LoRe rank sweep")
        axis.legend()
        _write_outputs(Path(out_dir), payload, header, rows, figure)
        plt.close(figure)
    lines = [f"{'K':>4}" + "".join(f"{key:>22}" for key in PROTOCOL_KEYS)]
    for row in rows:
        lines.append(f"{row[0]:>4}" + "".join(f"{row[1 + 2 * i]:>22.4f}" for i in range(len(PROTOCOL_KEYS))))
    print("\n".join(lines))
    return payload


def _experiment_as_config(args: list[str]) -> list[str]:
    """``rank --config EXPERIMENT``: an experiment config (it has a ``trainer`` or ``model``) given to
    ``--config`` is the experiment to sweep, not the sweep's own settings."""
    import yaml

    args = list(args)
    if not args or args[0] != "rank":
        return args
    for i, arg in enumerate(args[:-1]):
        if arg in ("--config", "-c") and Path(args[i + 1]).is_file():
            content = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            if isinstance(content, dict) and ({"trainer", "model"} & set(content)):
                args[i] = "--experiment"
    return args


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lore-pl-sweep``."""
    from jsonargparse import CLI

    from lore_pl.cli import user_errors_in_one_line

    with user_errors_in_one_line():  # exit_on_error=False: the parser's errors too, without the usage
        CLI([shots, rank], args=_experiment_as_config(sys.argv[1:] if args is None else args), as_positional=False,
            exit_on_error=False)


if __name__ == "__main__":
    main()
