"""How well the default estimator generalizes, on planted data where the truth is known.

One JSON line per (case, method): ``{"case", "method", "unseen_test", "seen_test", "bayes", ...}``,
the accuracies the mean over users of per-user accuracy, unseen users adapted from 10 shots each and
scored on test prompts nobody trained on. Everything a method tunes is chosen on validation prompts
(the data module's ``val_fraction`` of the training prompts, disjoint from training and test); the test
prompts are read once, here. Methods, all on the same users, pairs and prompts:

- ``default``: ``BasisModule()`` (the MAP estimator, ``rank: auto``) and the default few-shot fit;
- ``bt``: one shared Bradley-Terry direction (K=1) by the same ridge path, chosen on validation pairs;
- ``population``: every unseen user at the seen users' mean weights on the default basis;
- ``reference``: the reference code's settings (K=5, joint Adam at lr 0.5, tau 100, the last iterate;
  few-shot from a random start, no prior);
- ``oracle_v``: the true V with the default's seen-user fit and few-shot fit: the ceiling of any basis.

Cases ``d{dim}_{iso|aniso}[_r{directions}]_m{pairs per seen user}``: 1000 seen users with m labelled pairs
each (20% of the training prompts are validation prompts, so about 0.8 m train and 0.2 m validation
pairs), 200 unseen users (a pool of 50, 10 shots), 20 test pairs per user, 5 true directions (or r),
Bradley-Terry labels (noise temperature 0.4), no V_ref. ``no_signal``: every user has the same true
direction. ``d{dim}_imbalanced_m{a}_m{b}``: the shape of real files, users with unequal amounts of data:
every other seen user keeps only the first a of their b pairs (before the validation hold-out).

    python benchmarks/quality.py --quick      # d1024_iso_m30, no_signal, d4096_iso_m30 (under 5 minutes)
    python benchmarks/quality.py              # every case (about 30 minutes), the curves in quality.png
    python benchmarks/quality.py --cases d1024_iso_m30 --methods default bt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.protocol import evaluate_protocol, shared_baseline  # noqa: E402
from datamodules import SyntheticPopulationDataModule  # noqa: E402
from lore_pl.cli import quiet  # noqa: E402
from lore_pl.core import estimator as E  # noqa: E402
from lore_pl.core.fewshot import FewShotSettings  # noqa: E402
from lore_pl.core.model import LoreModel  # noqa: E402
from lore_pl.modules.basis import BasisModule  # noqa: E402

QUICK = ("d1024_iso_m30", "no_signal", "d4096_iso_m30")
ALL = ("d4096_iso_m30", "d1024_iso_m10", "d1024_iso_m30", "d1024_iso_m100", "d1024_iso_m300", "d1024_aniso_m30",
       "no_signal", "d1024_imbalanced_m5_m100", "d1024_iso_r10_m30")
METHODS = ("default", "bt", "population", "reference", "oracle_v")
REFERENCE_FEWSHOT = FewShotSettings(shots=10, weight_init="randn", prior_strength=0.0)


class ImbalancedPopulation(SyntheticPopulationDataModule):
    """The planted population with every other seen user cut to their first ``light_pairs`` training pairs."""

    def __init__(self, light_pairs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.light_pairs = light_pairs

    def load(self):
        data = super().load()
        train = data.splits["seen_train"]
        rank_in_user = torch.arange(len(train)) - torch.searchsorted(train.users, train.users)  # users are sorted
        keep = (train.users % 2 == 0) | (rank_in_user < self.light_pairs)
        data.splits["seen_train"] = train.subset(torch.nonzero(keep)[:, 0])
        return data


def case_data(case: str, seed: int = 0) -> SyntheticPopulationDataModule:
    light = None
    if case == "no_signal":
        dim, decay, pairs, directions = 1024, 0.0, 30, 1
    elif match := re.fullmatch(r"d(\d+)_imbalanced_m(\d+)_m(\d+)", case):
        dim, decay, light, pairs, directions = int(match[1]), 0.0, int(match[2]), int(match[3]), 5
    elif match := re.fullmatch(r"d(\d+)_(iso|aniso)(?:_r(\d+))?_m(\d+)", case):
        dim, decay, pairs = int(match[1]), 0.0 if match[2] == "iso" else 1.0, int(match[4])
        directions = int(match[3] or 5)
    else:
        raise ValueError(f"unknown case {case!r}: d{{dim}}_{{iso|aniso}}[_r{{directions}}]_m{{pairs}}, "
                         "d{dim}_imbalanced_m{light}_m{pairs} or no_signal")
    options = dict(
        dim=dim, num_directions=directions, num_train_prompts=3000, num_test_prompts=500, num_seen_users=1000,
        num_unseen_users=200, train_prompts_per_user=pairs, fewshot_prompts_per_user=50, test_prompts_per_user=20,
        labels="bradley_terry", noise_temperature=0.4, spectrum_decay=decay, reference_head="none", val_fraction=0.2,
        seed=seed)
    data = SyntheticPopulationDataModule(**options) if light is None else ImbalancedPopulation(light, **options)
    data.setup("fit")
    return data


def fit(module: BasisModule, data, epochs: int) -> BasisModule:
    from lightning import Trainer

    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      check_val_every_n_epoch=1 if module.hparams.estimator == "map" else epochs + 1,
                      log_every_n_steps=50)
    trainer.fit(module, datamodule=data)
    return module


def oracle_model(data) -> LoreModel:
    """The true V on the logit scale (``D / noise temperature``) with the seen users' logits and their
    mean fitted by MAP, the prior chosen on the validation pairs, V fixed."""
    basis = data.true_directions / data.hparams.noise_temperature
    train, val = data.split("seen_train"), data.split("seen_val")
    best = None
    for prior in (0.1, 1.0):
        start = E.MapState(basis, torch.zeros(train.num_users, basis.shape[1]), torch.zeros(basis.shape[1]))
        state = E.fit_map(train.features, train.users, train.num_users, start, E.Strengths(1.0, 1.0, prior), 300,
                          fixed_basis=True)
        nll, _ = E.evaluate(val.features, val.users, train.num_users, state)
        if best is None or nll < best[0]:
            best = (nll, state, prior)
    _, state, prior = best
    return LoreModel(basis, state.logits, tau=1.0, num_users=train.num_users, prior_mean=state.mean,
                     prior_precision=torch.full((basis.shape[1],), prior), train_basis=False, train_logits=False)


def row(case: str, method: str, results: dict, seconds: float, **extra) -> dict:
    out = {"case": case, "method": method, "unseen_test": results["unseen/test_acc"],
           "seen_test": results["seen/test_acc"], "bayes": results.get("oracle/unseen/test_acc"),
           "seconds": round(seconds, 1), **extra}
    print(json.dumps(out), flush=True)
    return out


def run_case(case: str, methods: tuple[str, ...], seed: int = 0) -> list[dict]:
    start = time.perf_counter()
    data = case_data(case, seed)
    rows, prepared = [], time.perf_counter() - start
    if {"default", "bt", "population"} & set(methods):
        start = time.perf_counter()
        torch.manual_seed(seed)
        module = fit(BasisModule(), data, epochs=30)
        shared, _ = shared_baseline(module.model, data)
        results = evaluate_protocol(module.model, data, FewShotSettings(), shared=shared)
        seconds = time.perf_counter() - start
        gains = {name: [results[f"gain/{name}/unseen/test_acc"], results[f"gain/{name}/unseen/test_acc_low"],
                        results[f"gain/{name}/unseen/test_acc_high"]] for name in ("shared", "population")}
        if "default" in methods:
            rows.append(row(case, "default", results, seconds + prepared, chosen_rank=module.model.rank,
                            ridge=module.selection.get("ridge"), strengths=module.selection.get("strengths"),
                            fewshot_prior=results.get("fewshot_prior"), gain_over_bt=gains["shared"],
                            gain_over_population=gains["population"]))
        for method, name in (("bt", "shared"), ("population", "population")):
            if method in methods:
                rows.append(row(case, method, {"unseen/test_acc": results[f"baselines/{name}/unseen/test_acc"],
                                               "seen/test_acc": results[f"baselines/{name}/seen/test_acc"],
                                               **{k: v for k, v in results.items() if k.startswith("oracle/")}}, 0.0))
    if "reference" in methods:
        start = time.perf_counter()
        torch.manual_seed(seed)
        module = fit(BasisModule(rank=5, estimator="adam", lr=0.5, tau=100.0, fewshot=REFERENCE_FEWSHOT), data,
                     epochs=1000 if data.dim <= 1024 else 500)
        results = evaluate_protocol(module.model, data, REFERENCE_FEWSHOT)
        rows.append(row(case, "reference", results, time.perf_counter() - start))
    if "oracle_v" in methods and data.hparams.num_directions > 1:
        start = time.perf_counter()
        results = evaluate_protocol(oracle_model(data), data, FewShotSettings())
        rows.append(row(case, "oracle_v", results, time.perf_counter() - start,
                        fewshot_prior=results.get("fewshot_prior")))
    return rows


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in rows if re.fullmatch(r"d1024_iso_m\d+", r["case"])]
    if not curve:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in METHODS + ("bayes",):
        points = sorted((int(r["case"].rsplit("m", 1)[1]), r["bayes"] if method == "bayes" else r["unseen_test"])
                        for r in curve if r["method"] == (method if method != "bayes" else "default"))
        if points:
            axis.plot(*zip(*points), marker="o", label=method, linestyle="--" if method == "bayes" else "-")
    axis.set(xscale="log", xlabel="labelled pairs per seen user (d=1024, isotropic)",
             ylabel="unseen users' test accuracy", title="learning curve on planted data")
    axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", nargs="+", help="these cases (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON lines to this file (and the figure beside it)")
    args = parser.parse_args(argv)
    quiet()
    cases = args.cases or (QUICK if args.quick else ALL)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cases": list(cases)}))
    rows = [r for case in cases for r in run_case(case, tuple(args.methods), args.seed)]
    if args.output:
        output = Path(args.output)
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
        figure(rows, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
