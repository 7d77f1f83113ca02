"""Use a learned basis without Lightning: score responses for a user, rank candidates, add a user.

    model = PersonalRewardModel.load("lightning_logs/synthetic/version_0/basis.safetensors")
    rewards = model.score(embeddings, "seen-00001")          # [n] rewards e . V w_u
    best_first = model.rank(candidate_embeddings, "seen-00001")
    model.personalize("new-user", chosen_embeddings, rejected_embeddings)  # K numbers, milliseconds

Embeddings must come from the embedder the basis was trained on (``model.embedder``).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import Tensor

from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings, adapt_users, weight_covariance
from lore_pl.data.basis_file import BasisFile, load_basis, save_basis


class PersonalRewardModel:
    """A frozen ``LoreModel``: a basis V, tau, and named users; every user's reward is ``e . V w_u``."""

    def __init__(self, exported: BasisFile) -> None:
        weights = exported.user_weights
        if weights is not None and len(exported.user_ids) != weights.shape[0]:
            raise ValueError(f"{len(exported.user_ids)} user ids but {weights.shape[0]} rows of user weights")
        self.model = exported.to_model()
        self._row = {user: i for i, user in enumerate(self.model.user_ids)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> PersonalRewardModel:
        return cls(load_basis(path))

    def save(self, path: str | os.PathLike) -> None:
        save_basis(path, BasisFile.from_model(self.model))

    @property
    def basis(self) -> Tensor:
        return self.model.basis

    @property
    def tau(self) -> float:
        return self.model.temperature

    @property
    def reference_head(self) -> Tensor | None:
        return self.model.reference_head

    @property
    def embedder(self) -> str:
        return self.model.embedder

    @property
    def user_ids(self) -> list[str]:
        return self.model.user_ids

    @property
    def user_weights(self) -> Tensor:
        """Every user's weights ``[C, K]``, row by row as ``user_ids``."""
        return self.model.user_weights()

    @property
    def basis_rank(self) -> int:
        """K, the number of basis columns."""
        return self.model.rank

    def weights(self, user: str) -> Tensor:
        if user not in self._row:
            raise KeyError(f"unknown user {user!r}: not among the {len(self.user_ids)} users of this model")
        return self.user_weights[self._row[user]]

    def head(self, user: str) -> Tensor:
        """The user's personal reward direction ``V w_u`` ``[d]``."""
        return self.basis @ self.weights(user)

    def _embeddings(self, embeddings: Tensor, what: str = "embeddings") -> Tensor:
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"embeddings have d={embeddings.shape[-1]}, the basis has d={self.basis.shape[0]}")
        bad = (~torch.isfinite(embeddings)).nonzero()
        if len(bad):
            raise ValueError(f"{what}: {len(bad)} non-finite value(s) in the embeddings, the first at row "
                             f"{int(bad[0][0])}; nothing was scored or stored")
        return embeddings

    def score(self, embeddings: Tensor, user: str) -> Tensor:
        """Rewards ``e . V w_u`` of responses ``[n, d]`` (or one ``[d]``) for ``user``: ``[n]``."""
        return self._embeddings(embeddings) @ self.head(user)

    def rank(self, candidates: Tensor, user: str) -> Tensor:
        """Indices of ``candidates`` ``[n, d]`` from the user's best to worst (personalized best-of-n)."""
        return torch.argsort(self.score(candidates, user), descending=True, stable=True)

    def preference_probability(self, chosen: Tensor, rejected: Tensor, user: str) -> Tensor:
        """``P(user prefers chosen)`` = ``sigmoid((e_c - e_r) . V w_u / tau)``, per pair."""
        return torch.sigmoid((self.score(chosen, user) - self.score(rejected, user)) / self.tau)

    def weight_covariance(self, user: str) -> Tensor | None:
        """The posterior covariance ``[K, K]`` of the user's weights (Laplace), where the model has it."""
        covariance = self.model.weight_covariance
        if covariance is None:
            self.weights(user)  # unknown users still raise
            return None
        return covariance[self._row[user]] if user in self._row else self.weights(user)

    def score_std(self, embeddings: Tensor, user: str) -> Tensor | None:
        """The posterior standard deviation of the rewards ``e . V w_u`` ``[n]`` that comes from not
        knowing ``w_u`` exactly (a user with few pairs has a wide one); None without a covariance."""
        embeddings = self._embeddings(embeddings)
        covariance = self.weight_covariance(user)
        if covariance is None:
            return None
        directions = embeddings @ self.basis  # [n, K]: e . V
        return ((directions @ covariance.float()) * directions).sum(-1).clamp(min=0).sqrt()

    def personalize(self, user: str, chosen: Tensor, rejected: Tensor, *, steps: int = 500, lr: float = 0.1,
                    init: str = "population", prior_strength: float | None = None, seed: int = 0,
                    settings: FewShotSettings | None = None) -> Tensor:
        """Fit a new (or refit an existing) user's weights from a few pairs; returns ``w`` ``[K]``.

        V stays frozen: the pairs are projected once and only K logits are fitted by the project's
        one few-shot solver (phase 2), with ``settings`` or the keyword arguments (all pairs are used).
        The user starts at the population's mean logits and is pulled towards them by the basis's own
        prior (``prior_strength`` null; chosen on held-out prompts when the basis was trained), so one
        pair moves a user little and many pairs move them to their own fit; ``prior_strength`` 0 and
        ``init='randn'`` are the reference's plain fit. The user's weight covariance is kept too.
        """
        differences = (self._embeddings(chosen, f"personalize({user!r}): chosen")
                       - self._embeddings(rejected, f"personalize({user!r}): rejected"))
        if not bool(torch.isfinite(differences).all()):  # each finite, the difference overflowed
            raise ValueError(f"personalize({user!r}): the embeddings' differences overflow; nothing was stored")
        prior = self.model.population_logits()
        if settings is None:
            if init == "population" and prior is None:
                init = "zeros"  # no stored users to average: start from uniform weights
            settings = FewShotSettings(shots=None, shot_seed=seed, steps=steps, lr=lr, weight_init=init,
                                       prior_strength=prior_strength)
        settings = replace(settings, shots=None)
        users = torch.zeros(differences.shape[0], dtype=torch.long)
        projected = LF.project(differences, self.basis)
        precision = self.model.prior_precision if settings.prior_strength is None else settings.prior_strength
        logits = adapt_users(projected, users, 1, settings, self.tau, prior, prior_precision=self.model.prior_precision)
        covariance = None
        if self.model.personalized:
            covariance = weight_covariance(projected, users, logits, self.tau, precision)[0]
        self._set_user(user, logits[0], covariance)
        return self.weights(user)

    def _set_user(self, user: str, logits: Tensor, covariance: Tensor | None) -> None:
        model = self.model
        known = self.model.weight_covariance is not None
        if user not in self._row:
            self._row[user] = model.num_users
            model.user_ids.append(user)
            model.num_users += 1
            if model.personalized:
                model.user_logits = torch.cat([model.user_logits, logits[None].to(model.user_logits)])
                if covariance is not None and (known or model.num_users == 1):
                    previous = model.weight_covariance if known else covariance.new_zeros(0, *covariance.shape)
                    model.weight_covariance = torch.cat([previous, covariance[None].to(previous)])
        elif model.personalized:
            model.user_logits[self._row[user]] = logits
            if covariance is not None and known:
                model.weight_covariance[self._row[user]] = covariance
