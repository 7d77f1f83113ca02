"""Few-shot experiments as one batched problem: every (shots, trial, user) is its own K-logit fit.

Because ``functional.fewshot_loss`` is a sum of independent per-user terms, stacking all fits as
"virtual users" of one big fit gives exactly each fit's own answer (a test checks this), and the
whole shots x trials x users sweep costs one run of full-batch Adam instead of a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lore_pl import functional as LF
from lore_pl.preferences import PreferenceSplit

#: Few-shot methods compared by the shots sweep: (weight init, prior strength). ``auto`` picks the
#: prior strength with ``choose_prior_strength``.
METHODS = {
    "reference": ("randn", 0.0),  # the reference: random start, no prior
    "population": ("population", 0.0),  # start at the seen users' mean weights
    "map": ("population", "auto"),  # that start plus a Gaussian prior around it (MAP)
}
DEFAULT_PRIOR_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class StackedFits:
    """The pairs of many independent fits, stacked as virtual users ``fit * C + user``."""

    projected: Tensor  # [rows, K]
    users: Tensor  # [rows], virtual user ids
    num_fits: int
    num_users: int


def stack_shots(projected: Tensor, users: Tensor, num_users: int, shots: list[int], trials: int,
                generator: torch.Generator) -> StackedFits:
    """For every (shots, trial), in that order, a fresh ``shots``-per-user subsample of the pool."""
    rows, virtual = [], []
    for fit, shot_count in enumerate(s for s in shots for _ in range(trials)):
        kept = LF.sample_shots(users, shot_count, generator)
        rows.append(kept)
        virtual.append(users[kept] + fit * num_users)
    index = torch.cat(rows)
    return StackedFits(projected[index], torch.cat(virtual), len(shots) * trials, num_users)


def per_fit_accuracy(projected_test: Tensor, test_users: Tensor, weights: Tensor, tau: float) -> Tensor:
    """Mean over users of per-user test accuracy for each fit: ``weights`` ``[F, C, K]`` -> ``[F]``.

    Users without test pairs are left out, as in ``PerUserAccuracy``.
    """
    logits = torch.einsum("nk,fnk->fn", projected_test, weights[:, test_users]) / tau
    num_fits, num_users = weights.shape[:2]
    correct = torch.zeros(num_fits, num_users, dtype=torch.float64, device=logits.device)
    correct.index_add_(1, test_users, (logits > 0).double())
    total = torch.bincount(test_users, minlength=num_users).double()
    present = total > 0
    return (correct[:, present] / total[present]).mean(dim=1)


def fit_stacked(stacked: StackedFits, rank: int, init: str, prior_logits: Tensor | None, prior_strength: float,
                *, steps: int, lr: float, tau: float, generator: torch.Generator) -> Tensor:
    """Fit all stacked fits at once; returns weights ``[F, C, K]``."""
    total = stacked.num_fits * stacked.num_users
    if rank <= 1:
        return torch.ones(stacked.num_fits, stacked.num_users, 1)
    init_logits = LF.initial_user_logits(total, rank, init, generator, prior_logits)
    logits = LF.fit_user_weights(stacked.projected, stacked.users, init_logits, steps=steps, lr=lr, tau=tau,
                              prior_logits=prior_logits, prior_strength=prior_strength)
    return LF.simplex_weights(logits).reshape(stacked.num_fits, stacked.num_users, rank)


def choose_prior_strength(basis: Tensor, tau: float, seen_train: PreferenceSplit, seen_test: PreferenceSplit,
                          seen_weights: Tensor, shots: int, grid=DEFAULT_PRIOR_GRID, trials: int = 2,
                          steps: int = 500, lr: float = 0.1, seed: int = 0) -> float:
    """Pick the prior strength by simulating the few-shot problem on the seen users.

    Each seen user is treated as new: ``shots`` of their train pairs, fitted from the population
    start with each strength of ``grid``, scored on their test pairs; the strength with the best
    mean accuracy wins (ties: the weaker prior). Optimistic in absolute terms (V was trained on
    these users' pairs), but it ranks strengths on the real shots count and population spread.
    """
    prior = LF.population_logits(seen_weights)
    generator = torch.Generator().manual_seed(seed)
    stacked = stack_shots(LF.project(seen_train.features, basis), seen_train.users, seen_train.num_users,
                          [shots], trials, generator)
    projected_test = LF.project(seen_test.features, basis)
    scores = []
    for strength in grid:
        weights = fit_stacked(stacked, basis.shape[1], "population", prior, strength, steps=steps, lr=lr, tau=tau,
                              generator=generator)
        scores.append(float(per_fit_accuracy(projected_test, seen_test.users, weights, tau).mean()))
    best = max(range(len(grid)), key=lambda i: (round(scores[i], 6), -grid[i]))
    return float(grid[best])


def shots_sweep(basis: Tensor, tau: float, pool: PreferenceSplit, test: PreferenceSplit, shots: list[int],
                trials: int, *, init: str = "randn", prior_logits: Tensor | None = None,
                prior_strength: float = 0.0, steps: int = 500, lr: float = 0.1, seed: int = 0) -> Tensor:
    """Unseen users' test accuracy (mean over users) for each (shots, trial): ``[len(shots), trials]``."""
    generator = torch.Generator().manual_seed(seed)
    stacked = stack_shots(LF.project(pool.features, basis), pool.users, pool.num_users, shots, trials, generator)
    weights = fit_stacked(stacked, basis.shape[1], init, prior_logits, prior_strength, steps=steps, lr=lr, tau=tau,
                          generator=generator)
    return per_fit_accuracy(LF.project(test.features, basis), test.users, weights, tau).reshape(len(shots), trials)
