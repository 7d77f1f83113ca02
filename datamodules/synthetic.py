"""The built-in default data: a planted low-rank population, in the style of PersonalLLM."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from datamodules.base import PreferenceData, PreferenceDataModule
from lore_pl.core import functional as LF
from lore_pl.data.preferences import PreferenceSplit


class SyntheticPopulationDataModule(PreferenceDataModule):
    """Users who mix M true reward directions, judging random responses to shared prompts.

    Generated in-process from ``seed``. Each prompt has R candidate responses with random embeddings
    in R^d; user u's true reward of a response is ``e . D w_u`` with ``D`` ``[d, M]`` (unit columns)
    and ``w_u ~ Dirichlet(dirichlet_alpha)``. A pair is the best against the worst response under
    the user's true reward (the PersonalLLM simulator) or, with ``labels: bradley_terry``, two random
    responses labelled by a Bradley-Terry draw. Train and test prompts are disjoint; seen and unseen
    users are disjoint; the validation prompts are held out of the train prompts (``val_fraction``).
    ``V_ref`` is by default the population-mean direction ``D 1/M`` (the truth: use ``reference_head``
    to make it less informed), and the true model is kept, so the oracle's accuracy is reported
    beside the model's. ``num_directions: 1`` is a population without personal signal: every user
    has the same true direction.

    Args:
        dim: embedding dimension d.
        num_directions: M, the planted rank.
        responses_per_prompt: R, candidate responses per prompt.
        num_train_prompts: prompts that train pairs and the few-shot pool are drawn from.
        num_test_prompts: prompts that test pairs are drawn from.
        num_seen_users: users whose pairs train the basis.
        num_unseen_users: new users adapted by few-shot.
        train_prompts_per_user: train prompts per seen user (an int, or a fraction of the prompts).
        fewshot_prompts_per_user: train prompts per unseen user, their few-shot pool (int or fraction).
        test_prompts_per_user: test prompts per user, seen and unseen (int or fraction).
        dirichlet_alpha: concentration of the users' true weights (0.1: most users near one direction).
        labels: ``best_worst`` (deterministic, the oracle is always right) or ``bradley_terry`` (noisy).
        noise_temperature: Bradley-Terry temperature on the true reward difference.
        spectrum_decay: embedding variance of coordinate i is proportional to ``i^-spectrum_decay``
            (0: isotropic; about 1 resembles real embeddings' decaying spectrum).
        reference_head: the ``V_ref`` the data provide: ``mean`` (the true population-mean direction),
            ``none``, or a number c: a direction of the same norm at cosine c to the true mean.
        seed: seed of everything generated.
        **kwargs: the loading arguments of ``PreferenceDataModule`` (batch sizes, shuffling, validation hold-out).
    """

    def __init__(
        self,
        dim: int = 256,
        num_directions: int = 5,
        responses_per_prompt: int = 8,
        num_train_prompts: int = 2000,
        num_test_prompts: int = 500,
        num_seen_users: int = 500,
        num_unseen_users: int = 100,
        train_prompts_per_user: int | float = 30,
        fewshot_prompts_per_user: int | float = 50,
        test_prompts_per_user: int | float = 50,
        dirichlet_alpha: float = 0.1,
        labels: Literal["best_worst", "bradley_terry"] = "best_worst",
        noise_temperature: float = 1.0,
        spectrum_decay: float = 0.0,
        reference_head: Literal["mean", "none"] | float = "mean",
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("dim", dim), ("num_directions", num_directions), ("num_train_prompts", num_train_prompts),
                            ("num_test_prompts", num_test_prompts), ("num_seen_users", num_seen_users)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_unseen_users < 0:
            raise ValueError(f"num_unseen_users must be >= 0, got {num_unseen_users}")
        if responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be >= 2, got {responses_per_prompt}")
        if dirichlet_alpha <= 0 or noise_temperature <= 0:
            raise ValueError("dirichlet_alpha and noise_temperature must be positive")
        if labels not in ("best_worst", "bradley_terry"):
            raise ValueError(f"labels must be 'best_worst' or 'bradley_terry', got {labels!r}")
        if reference_head not in ("mean", "none") and not (isinstance(reference_head, (int, float))
                                                          and -1.0 <= reference_head <= 1.0):
            raise ValueError(f"reference_head must be 'mean', 'none' or a cosine in [-1, 1], got {reference_head!r}")
        self.save_hyperparameters()
        self.true_directions: Tensor | None = None
        self.true_weights: dict[str, Tensor] = {}

    @property
    def embedder(self) -> str:
        hp = self.hparams
        return (f"SyntheticPopulation(seed={hp.seed}, dim={hp.dim}, responses={hp.responses_per_prompt}, "
                f"spectrum_decay={hp.spectrum_decay})")

    def _count(self, value: int | float, available: int, name: str) -> int:
        count = int(round(value * available)) if isinstance(value, float) else int(value)
        if not 1 <= count <= available:
            raise ValueError(f"{name}={value} gives {count} prompts per user; it must be in [1, {available}]")
        return count

    def load(self) -> PreferenceData:
        hp = self.hparams
        rng = np.random.default_rng(hp.seed)
        scale = np.arange(1, hp.dim + 1, dtype=np.float64) ** (-hp.spectrum_decay / 2)
        scale *= np.sqrt(hp.dim / np.sum(scale**2))  # mean variance 1 whatever the decay
        directions = rng.standard_normal((hp.dim, hp.num_directions))
        directions /= np.linalg.norm(directions, axis=0, keepdims=True)
        prompts = {
            "train": rng.standard_normal((hp.num_train_prompts, hp.responses_per_prompt, hp.dim)) * scale,
            "test": rng.standard_normal((hp.num_test_prompts, hp.responses_per_prompt, hp.dim)) * scale,
        }
        population = {"seen": hp.num_seen_users, "unseen": hp.num_unseen_users}
        weights = {name: rng.dirichlet(np.full(hp.num_directions, hp.dirichlet_alpha), size=count)
                   for name, count in population.items()}
        per_user = {
            "seen_train": (
                "train",
                self._count(hp.train_prompts_per_user, hp.num_train_prompts, "train_prompts_per_user"),
            ),
            "seen_test": ("test", self._count(hp.test_prompts_per_user, hp.num_test_prompts, "test_prompts_per_user")),
            "unseen_pool": (
                "train",
                self._count(hp.fewshot_prompts_per_user, hp.num_train_prompts, "fewshot_prompts_per_user"),
            ),
            "unseen_test": (
                "test",
                self._count(hp.test_prompts_per_user, hp.num_test_prompts, "test_prompts_per_user"),
            ),
        }
        first_id = {"train": 0, "test": hp.num_train_prompts}  # prompt ids, distinct across the two sets
        splits = {}
        for role, (prompt_set, count) in per_user.items():
            population_name = role.split("_")[0]
            if population[population_name] == 0:
                continue
            user_ids = [f"{population_name}-{i:05d}" for i in range(population[population_name])]
            features, users, prompt_of = self._simulate(
                rng, prompts[prompt_set], directions, weights[population_name], count
            )
            splits[role] = PreferenceSplit(
                features, users, user_ids, name=role, prompts=prompt_of + first_id[prompt_set]
            )
        self.true_directions = torch.from_numpy(directions).float()
        self.true_weights = {name: torch.from_numpy(w).float() for name, w in weights.items()}
        return PreferenceData(splits, reference_head=self._reference_head(self.true_directions.mean(dim=1)))

    def _reference_head(self, mean: Tensor) -> Tensor | None:
        choice = self.hparams.reference_head
        if choice == "none":
            return None
        if choice == "mean":
            return mean
        # a direction at cosine c to the truth, of its norm: c m + sqrt(1 - c^2) |m| r with r orthogonal to m
        other = torch.randn(
            mean.shape[0], generator=torch.Generator().manual_seed(self.hparams.seed + 1), dtype=torch.float64
        )
        unit = (mean / mean.norm()).double()
        other = other - (other @ unit) * unit
        other = other / other.norm()
        cosine = float(choice)
        return (mean.norm() * (cosine * unit + (1 - cosine**2) ** 0.5 * other)).float()

    def _simulate(self, rng, embeddings: np.ndarray, directions: np.ndarray, weights: np.ndarray, per_user: int):
        """Pairs of every user on ``per_user`` distinct random prompts, as ``x = e(chosen) - e(rejected)``."""
        num_users = weights.shape[0]
        num_prompts, num_responses, _ = embeddings.shape
        prompt_of = np.argsort(rng.random((num_users, num_prompts)), axis=1)[:, :per_user].reshape(-1)
        users = np.repeat(np.arange(num_users), per_user)
        # true reward of every candidate response for its user: [pairs, R]
        rewards = ((embeddings @ directions)[prompt_of] * weights[users][:, None, :]).sum(-1)
        rows = np.arange(users.size)
        if self.hparams.labels == "best_worst":
            chosen, rejected = rewards.argmax(axis=1), rewards.argmin(axis=1)
        else:
            first = rng.integers(num_responses, size=users.size)
            second = (first + rng.integers(1, num_responses, size=users.size)) % num_responses
            margin = (rewards[rows, first] - rewards[rows, second]) / self.hparams.noise_temperature
            first_wins = rng.random(users.size) < 1.0 / (1.0 + np.exp(-margin))
            chosen, rejected = np.where(first_wins, first, second), np.where(first_wins, second, first)
        features = embeddings[prompt_of, chosen] - embeddings[prompt_of, rejected]
        return torch.from_numpy(features).float(), torch.from_numpy(users).long(), torch.from_numpy(prompt_of).long()

    def oracle_logits(self, role: str, split: PreferenceSplit) -> Tensor | None:
        self.data  # noqa: B018 - the truth exists once the data are generated
        weights = self.true_weights[role.split("_")[0]]
        return (LF.project(split.features, self.true_directions) * weights[split.users]).sum(-1)
