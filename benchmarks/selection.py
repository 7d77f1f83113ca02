"""Model selection's cost: the autograd path it replaced (``select_model(fast=False)``) and the fast path,
in one process on the same data, with the same chosen K and strengths asked of both (issue 22).

Per case, one JSON line per path and one line of ratios:

- ``selection``: ``select_model`` alone (same subspace, same data), wall and CPU seconds (all threads; on a
  shared machine a one-thread process gets half the share of a two-thread one, so wall time alone
  misleads there) and the choice;
- with ``--fit``: the whole default fit (``BasisModule()``, 30 epochs as configs/trainer/default.yaml)
  and the protocol, so the headline (unseen users from 10 shots on test prompts) stands beside K=1,
  the population-average weights and "the longer response wins" (n/a on planted data: no lengths).

Cases: ``default`` is configs/data/synthetic.yaml (500 seen users, d=256, 30 prompts each);
``c{users}_d{dim}`` is the same population with that many seen users and that dimension.

    python benchmarks/selection.py --fit                    # the default run, both paths, headline too
    python benchmarks/selection.py --cases c1000_d256 c10000_d256
    python benchmarks/selection.py --cases c10000_d256 --paths new   # users sampled for the search
    python benchmarks/selection.py --threads                # one thread or all, the small-op loops
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from lore_pl.core import functional as LF  # noqa: E402
from lore_pl.core.fewshot import FewShotSettings  # noqa: E402
from lore_pl.core.projected_fit import UserPairs, map_objective  # noqa: E402
from lore_pl.modules.basis import BasisModule  # noqa: E402

DEFAULT = dict(dim=256, num_directions=5, num_seen_users=500, num_unseen_users=100, train_prompts_per_user=30,
               fewshot_prompts_per_user=50, test_prompts_per_user=50, dirichlet_alpha=0.1, seed=0)


def case_data(case: str) -> SyntheticPopulationDataModule:
    options = dict(DEFAULT)
    if case != "default":
        match = re.fullmatch(r"c(\d+)_d(\d+)", case)
        if match is None:
            raise ValueError(f"unknown case {case!r}: default or c{{users}}_d{{dim}}")
        options.update(num_seen_users=int(match[1]), dim=int(match[2]))
    data = SyntheticPopulationDataModule(**options)
    data.setup("fit")
    return data


@contextlib.contextmanager
def selection_path(fast: bool):
    """``BasisModule`` calls ``E.select_model``: pin its ``fast`` for one fit."""
    original = E.select_model
    E.select_model = lambda *args, **kwargs: original(*args, **kwargs, fast=fast)
    try:
        yield
    finally:
        E.select_model = original


def choice(selection: E.Selection) -> dict:
    best = selection.best
    return {"rank": best.rank, "strengths": vars(best.strengths), "val_nll": round(best.val_nll, 6),
            "fits": len(selection.curve)}


def time_selection(case: str, data, paths: tuple[str, ...] = ("old", "new"), repeats: int = 2) -> list[dict]:
    """Each path ``repeats`` times, in turns (old, new, old, new: on a shared machine the load moves)."""
    train, val = data.split("seen_train"), data.split("seen_val")
    settings = E.MapSettings()
    subspace = E.spectral_subspace(train.features, train.users, train.num_users, settings.subspace)
    rows = {}
    for _ in range(repeats):
        for path, fast in (("old", False), ("new", True)):
            if path not in paths:
                continue
            start, cpu_start = time.perf_counter(), time.process_time()
            selection = E.select_model(train.features, train.users, val.features, val.users, train.num_users,
                                       settings, subspace=subspace, fast=fast)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            row = {"case": case, "what": "selection", "path": path, "seconds": round(seconds, 2),
                   "cpu_seconds": round(cpu_seconds, 2),
                   "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 1), **choice(selection),
                   "notes": selection.notes}
            print(json.dumps(row), flush=True)
            rows.setdefault(path, []).append(row)
    if len(rows) < 2:
        return [row for runs in rows.values() for row in runs]
    old, new = rows["old"], rows["new"]
    old_seconds, new_seconds = [r["seconds"] for r in old], [r["seconds"] for r in new]
    old_cpu, new_cpu = [r["cpu_seconds"] for r in old], [r["cpu_seconds"] for r in new]
    ratio = {"case": case, "what": "selection ratio",
             "old_over_new_fastest": round(min(old_seconds) / min(new_seconds), 1),
             "old_over_new_each": [round(a / b, 1) for a, b in zip(old_seconds, new_seconds)],
             "cpu_old_over_new_fastest": round(min(old_cpu) / min(new_cpu), 1),
             "same_choice": len({(r["rank"], json.dumps(r["strengths"])) for r in old + new}) == 1}
    print(json.dumps(ratio), flush=True)
    return [*old, *new, ratio]


def fit_and_protocol(case: str, data, fast: bool) -> dict:
    from lightning import Trainer

    torch.manual_seed(0)
    module = BasisModule()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=30, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      check_val_every_n_epoch=1, log_every_n_steps=50)
    start = time.perf_counter()
    with selection_path(fast):
        trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    shared, _ = shared_baseline(module.model, data)
    results = evaluate_protocol(module.model, data, FewShotSettings(), shared=shared)
    row = {"case": case, "what": "fit", "path": "new" if fast else "old", "fit_s": round(fit_seconds, 1),
           "load": round(os.getloadavg()[0], 1),
           "selection_s": module.selection["seconds"], "rank": module.selection["rank"],
           "strengths": module.selection["strengths"], "ridge": module.selection.get("ridge"),
           "headline": results["unseen/test_acc"], "seen_test": results["seen/test_acc"],
           "shared_k1": results["baselines/shared/unseen/test_acc"],
           "population": results["baselines/population/unseen/test_acc"],
           "longer_wins": results.get("baselines/longer/unseen/test_acc")}
    print(json.dumps(row), flush=True)
    return row


def compare_fits(case: str, data) -> list[dict]:
    old, new = fit_and_protocol(case, data, fast=False), fit_and_protocol(case, data, fast=True)
    ratio = {"case": case, "what": "fit ratio",
             "selection_old_over_new": round(old["selection_s"] / new["selection_s"], 1),
             "fit_old_over_new": round(old["fit_s"] / new["fit_s"], 2),
             "same_choice": (old["rank"], old["strengths"]) == (new["rank"], new["strengths"]),
             "headline_difference": round(new["headline"] - old["headline"], 4)}
    print(json.dumps(ratio), flush=True)
    return [old, new, ratio]


def time_threads(case: str, data, repeats: int = 200) -> None:
    """One evaluation of each small-op loop's step on one thread and on all, in turns."""
    train = data.split("seen_train")
    settings = E.MapSettings()
    subspace = E.spectral_subspace(train.features, train.users, train.num_users, settings.subspace)
    projected = LF.project(train.features, subspace).double()
    pairs = UserPairs.from_flat(projected, train.users, train.num_users)
    generator = torch.Generator().manual_seed(0)
    state = E.random_state(subspace.shape[1], 5, train.num_users, generator)
    full = E.MapState(torch.randn(train.features.shape[1], 5, generator=generator).requires_grad_(),
                      torch.randn(train.num_users, 5, generator=generator).requires_grad_(), torch.zeros(5))
    strengths = E.Strengths(1.0, 1.0, 1.0)

    def full_step():
        loss, _, _ = E.map_loss(train.features, train.users, train.num_users, full, strengths)
        loss.backward()

    def selection_step():
        map_objective(pairs, state.basis, state.logits, state.mean, 1.0, 1.0, 1.0)

    steps = {"selection objective": (pairs.projected.numel(), selection_step),
             "full-space step": (train.features.numel(), full_step)}
    threads = torch.get_num_threads()
    for name, (elements, step) in steps.items():
        times = {}
        for count in (1, threads, 1, threads):
            torch.set_num_threads(count)
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            times.setdefault(count, []).append((time.perf_counter() - start) / repeats * 1e3)
        torch.set_num_threads(threads)
        print(json.dumps({"case": case, "what": "threads", "loop": name, "elements": elements,
                          **{f"ms_{count}_threads": [round(t, 3) for t in ts] for count, ts in times.items()}}),
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["default"])
    parser.add_argument("--fit", action="store_true", help="also the whole fit and protocol with each path")
    parser.add_argument("--threads", action="store_true", help="only time one step of each loop on 1 thread or all")
    parser.add_argument("--paths", nargs="+", choices=("old", "new"), default=["old", "new"],
                        help="selection alone by these paths (new only where the old one takes too long)")
    args = parser.parse_args(argv)
    quiet()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cases": args.cases}), flush=True)
    for case in args.cases:
        data = case_data(case)
        if args.threads:
            time_threads(case, data)
            continue
        time_selection(case, data, tuple(args.paths))
        if args.fit:
            compare_fits(case, data)


if __name__ == "__main__":
    main()
